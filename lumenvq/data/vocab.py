"""SentencePiece vocabularies: train one on the knowledge source, or name any `.model`.

`get_vocabulary` wraps a SentencePiece model file, ours or an existing one
such as T5's, as the `seqio.SentencePieceVocabulary` the tasks use. Models
trained here follow T5's conventions (pad=0, eos=1, unk=2, no bos; unigram by default;
NFKC normalisation) and turn byte fallback on, so no text maps to unk.

Training reads sentences from `sentence_iterator`, never the whole 35 GB
file: with `max_sentences`, the file is cut into `windows` byte ranges and
the first sentences of each are taken (at least 100 per range), a deterministic
sample spread over the whole knowledge source that reads only about
max_sentences sentences' worth.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import Iterator, Sequence

from lumenvq import paths
from lumenvq.data import kilt, passages

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1
DEFAULT_EXTRA_IDS = 100  # T5's sentinel ids (<extra_id_0>..); T5X's T5 1.1 vocabularies use 100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def page_sentences(page) -> Iterator[str]:
  """The title, heading texts and paragraph sentences of a page, KILT markup removed."""
  for pid, paragraph in enumerate(page.paragraphs):
    start = passages.content_start(paragraph)
    if start is None:  # a heading line: keep its words, not the marker
      text = paragraph.replace(passages.SECTION_MARK, " ")
    else:
      text = paragraph[start:]
    for sentence in _SENTENCE_END.split(text.strip()) if pid else [text.strip()]:
      if sentence:
        yield sentence


def sentence_iterator(
    knowledge_source: str,
    max_sentences: int | None = None,
    windows: int = 1000,
    skip_bad_lines: bool = False,
) -> Iterator[str]:
  """Sentences of the knowledge source, all of them or a sample of `max_sentences` (module doc)."""
  size = paths.path(knowledge_source).stat().length
  if max_sentences is None:
    bounds, quota = [(0, size)], math.inf
  else:
    if max_sentences < 1:
      raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    windows = max(
        1, min(windows, max_sentences // 100, size)
    )  # runs of >= 100 sentences, not just titles
    bounds = [(size * i // windows, size * (i + 1) // windows) for i in range(windows)]
    quota = math.ceil(max_sentences / windows)
  total = 0
  for start, end in bounds:
    taken = 0
    for _, page in passages.iter_pages(
        knowledge_source, start, end, [] if skip_bad_lines else None
    ):
      for sentence in page_sentences(page):
        yield sentence
        taken, total = taken + 1, total + 1
        if total == max_sentences:
          return
        if taken >= quota:
          break
      if taken >= quota:
        break


def task_texts(kilt_files: Sequence[str]) -> Iterator[str]:
  """The inputs and answers of KILT task files: question words ("what", "who") that a
  knowledge source rarely contains, so the vocabulary covers what the reader is fed."""
  for path in kilt_files:
    for record in kilt.read_kilt(path):
      yield record.input
      yield from record.answers


def train_sentencepiece(
    knowledge_source: str,
    out_prefix: str,
    vocab_size: int = 8000,
    max_sentences: int | None = 2_000_000,
    character_coverage: float = 0.9995,
    threads: int = 2,
    skip_bad_lines: bool = False,
    model_type: str = "unigram",
    kilt_files: Sequence[str] = (),
) -> str:
  """Train a `model_type` (T5's unigram, or bpe) model on the knowledge source and the texts
  of `kilt_files`; writes `out_prefix.vocab` then `out_prefix.model`, each whole (a rename, or
  on gs:// one upload of the file trained on local disk): a `.model` is a finished one."""
  import sentencepiece as spm

  if paths.is_remote(out_prefix):
    tmp = os.path.join(tempfile.mkdtemp(prefix="lumenvq-spm-"), "spm")
  else:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp = f"{out_prefix}.tmp{os.getpid()}"
  failure: list[BaseException] = []

  def sentences():  # sentencepiece turns our errors into RuntimeError("INTERNAL: ..."): keep the original
    try:
      yield from sentence_iterator(knowledge_source, max_sentences, skip_bad_lines=skip_bad_lines)
      yield from task_texts(kilt_files)
    except Exception as err:
      failure.append(err)
      raise

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=tmp,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        num_threads=threads,
        minloglevel=2,
    )
  except RuntimeError:
    if failure:
      raise failure[0] from None
    raise
  else:
    for ext in ("vocab", "model"):  # The model last: its presence means done.
      if paths.is_remote(out_prefix):
        paths.upload(f"{tmp}.{ext}", f"{out_prefix}.{ext}")
      else:
        os.replace(f"{tmp}.{ext}", f"{out_prefix}.{ext}")
  finally:
    for leftover in (f"{tmp}.vocab", f"{tmp}.model"):
      if os.path.exists(leftover):
        os.remove(leftover)
  return f"{out_prefix}.model"


def get_vocabulary(path: str, extra_ids: int = DEFAULT_EXTRA_IDS):
  """A `seqio.SentencePieceVocabulary` for any SentencePiece `.model` (ours, T5's, ...).

  Models are checked for the ids seqio's feature converters assume (pad=0, eos=1). A
  gs:// model is read through the path layer into a local copy, which seqio then opens.
  """
  import sentencepiece as spm

  if not paths.path(path).is_file():
    raise FileNotFoundError(
        f"SentencePiece model {path} not found "
        "(train one with python -m lumenvq.data.train_vocab)"
    )
  local = paths.local_copy(path)
  processor = spm.SentencePieceProcessor(model_file=local)
  if (processor.pad_id(), processor.eos_id()) != (PAD_ID, EOS_ID):
    raise ValueError(
        f"SentencePiece model {path} has pad={processor.pad_id()} eos={processor.eos_id()}; "
        f"T5-style models need pad={PAD_ID} eos={EOS_ID}"
    )
  import seqio  # slow to import (~14 s): only where a vocabulary is made

  return seqio.SentencePieceVocabulary(local, extra_ids=extra_ids)
