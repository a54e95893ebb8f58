"""BM25 retrieval of passages for KILT questions, written as KILT retrieval files.

    python -m lumenvq.data.retrieve --passages TABLE_DIR --out OUT [--k 100] \
        (--kilt_files nq-dev-kilt.jsonl,fever-dev-kilt.jsonl | --data_dir D --tasks nq,fever [--splits dev])

Index. `bm25s` (BM25, Lucene variant, k1=1.5, b=0.75) over the passage texts
(title-prefixed, as stored in the table), tokenized by bm25s's `Tokenizer`:
lowercase, words = regex `(?u)\\b\\w\\w+\\b` (two or more word characters),
bm25s's English stopword list, and the Snowball English stemmer (nltk's
implementation of the Porter2 algorithm that bm25s's suggested PyStemmer
wraps; PyStemmer is not a dependency). Queries go through the same tokenizer
without growing its vocabulary. `bm25_build` assembles bm25s's index from packed token
arrays (millions of passages fit in memory). It is saved under OUT/bm25_index with the
tokenizer vocabulary and the passage table's fingerprint: it is built once and rebuilt
only for another table.

Output. For each input file `X-kilt.jsonl`, `OUT/X-bm25-kilt.jsonl` with the
same `id` and `input` and `output: [{"provenance": [top K passages]}]`, each
passage as KILT provenance (`wikipedia_id`, `title`, `start_paragraph_id`,
`end_paragraph_id`, `start_character`, `end_character`) plus `passage_id` and
`score`, best first, so KILT's retrieval metrics apply to it. Written under a
temporary name and renamed, then recorded in `X-bm25-kilt.jsonl.done`; a
rerun skips files whose record matches (same input size, K and table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Iterable, Iterator, Sequence

import bm25s
import numpy as np
import tqdm
from bm25s.tokenization import Tokenizer
from nltk.stem.snowball import SnowballStemmer

from lumenvq import paths
from lumenvq.data import bm25_build, kilt
from lumenvq.data.passage_table import PassageTable

logger = logging.getLogger(__name__)

INDEX_DIR = "bm25_index"
_INDEX_META = "lumenvq_index.json"
TOKENIZER_SETTINGS = {
    "lower": True,
    "splitter": r"(?u)\b\w\w+\b",
    "stopwords": "en",
    "stemmer": "snowball-english",
    "bm25": {"method": "lucene", "k1": 1.5, "b": 0.75},
}


def make_tokenizer() -> Tokenizer:
  """The tokenizer of TOKENIZER_SETTINGS (the stemmer is not saved by bm25s, so it is made here)."""
  return Tokenizer(
      lower=True,
      splitter=TOKENIZER_SETTINGS["splitter"],
      stopwords="en",
      stemmer=SnowballStemmer("english").stem,
  )


class Bm25Index:
  """A bm25s retriever over a passage table, with its tokenizer; `search` returns passage ids."""

  def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer):
    self.retriever, self.tokenizer = retriever, tokenizer

  @classmethod
  def build(cls, table: PassageTable, progress: bool = True) -> "Bm25Index":
    tokenizer = make_tokenizer()
    texts = tqdm.tqdm(
        table.iter_texts(),
        total=len(table),
        desc="tokenize passages",
        unit="passage",
        disable=not progress,
        mininterval=2,
    )
    ids = tokenizer.streaming_tokenize(texts, update_vocab=True)
    retriever = bm25_build.build(ids, tokenizer.get_vocab_dict, **TOKENIZER_SETTINGS["bm25"])
    return cls(retriever, tokenizer)

  @classmethod
  def load_or_build(cls, table: PassageTable, index_dir: str, progress: bool = True) -> "Bm25Index":
    """Load the index saved for this table in `index_dir`, or build and save it: written to a
    local directory, then published with its meta file as the marker (local or gs://)."""
    meta = {
        "fingerprint": table.fingerprint,
        "num_passages": len(table),
        "tokenizer": TOKENIZER_SETTINGS,
    }
    meta_path = paths.path(index_dir, _INDEX_META)
    if meta_path.exists():
      if json.loads(meta_path.read_text()) == meta:
        return cls.load(index_dir)
      logger.info("%s was built for another passage table or tokenizer: rebuilding", index_dir)
    index = cls.build(table, progress)
    tmp = paths.staging_dir(index_dir)
    index.retriever.save(tmp, show_progress=False)
    index.tokenizer.save_vocab(tmp)
    index.tokenizer.save_stopwords(tmp)
    with open(os.path.join(tmp, _INDEX_META), "w") as f:
      json.dump(meta, f)
    paths.publish_dir(tmp, index_dir, _INDEX_META)
    return index

  @classmethod
  def load(cls, index_dir: str) -> "Bm25Index":
    index_dir = paths.local_copy_dir(index_dir, _INDEX_META)  # bm25s memory-maps its arrays.
    retriever = bm25s.BM25.load(index_dir, load_vocab=True, mmap=True, show_progress=False)
    tokenizer = make_tokenizer()
    tokenizer.load_vocab(index_dir)
    tokenizer.load_stopwords(index_dir)
    return cls(retriever, tokenizer)

  @property
  def num_passages(self) -> int:
    return int(self.retriever.scores["num_docs"])

  def search(
      self, queries: Sequence[str], k: int, threads: int = 0
  ) -> tuple[np.ndarray, np.ndarray]:
    """(passage ids int32[Q, min(k, N)], scores float32[Q, min(k, N)]), best first."""
    ids = self.tokenizer.tokenize(
        list(queries), update_vocab=False, return_as="ids", show_progress=False
    )
    docs, scores = self.retriever.retrieve(
        ids,
        k=min(k, self.num_passages),
        show_progress=False,
        n_threads=threads,
        backend_selection="numpy",
    )
    return docs.astype(np.int32), scores.astype(np.float32)


def output_path(out_dir: str, kilt_file: str) -> str:
  """Where the retrieval file for `kilt_file` goes: X-kilt.jsonl -> OUT/X-bm25-kilt.jsonl."""
  name = os.path.basename(kilt_file)
  stem = name[: -len("-kilt.jsonl")] if name.endswith("-kilt.jsonl") else os.path.splitext(name)[0]
  return paths.join(out_dir, f"{stem}-bm25-kilt.jsonl")


def _provenance(passage, score: float) -> dict:
  return {
      "wikipedia_id": passage.wikipedia_id,
      "title": passage.title,
      "start_paragraph_id": passage.start_paragraph_id,
      "end_paragraph_id": passage.end_paragraph_id,
      "start_character": passage.start_character,
      "end_character": passage.end_character,
      "passage_id": passage.id,
      "score": round(float(score), 4),
  }


def _batches(items: Iterable, size: int) -> Iterator[list]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def retrieve_file(
    index: Bm25Index,
    table: PassageTable,
    kilt_file: str,
    out_path: str,
    k: int = 100,
    batch_size: int = 256,
    threads: int = 0,
    progress: bool = True,
) -> int:
  """Retrieve for every record of `kilt_file`, write `out_path` atomically; returns the record count.

  Skipped when `out_path` and its `.done` record match this input, K and table.
  """
  done = {
      "input": paths.resolve(kilt_file),
      "input_size": paths.path(kilt_file).stat().length,
      "k": k,
      "fingerprint": table.fingerprint,
  }
  if paths.path(out_path).exists() and paths.path(out_path + ".done").exists():
    previous = json.loads(paths.path(out_path + ".done").read_text())
    if {key: previous.get(key) for key in done} == done:
      logger.info(
          "%s is up to date (its .done record matches this input, K and passage table); "
          "skipping",
          out_path,
      )
      return previous["records"]
  count = 0
  bar = tqdm.tqdm(
      desc=os.path.basename(kilt_file), unit="question", disable=not progress, mininterval=2
  )
  paths.path(out_path + ".done").unlink(missing_ok=True)  # The marker goes first, returns last.
  with paths.atomic_open(out_path, "w") as out:
    for batch in _batches(kilt.read_kilt(kilt_file), batch_size):
      ids, scores = index.search([r.input for r in batch], k, threads)
      for record, row, row_scores in zip(batch, ids, scores):
        provenance = [_provenance(p, s) for p, s in zip(table.get(row.tolist()), row_scores)]
        out.write(
            json.dumps(
                {"id": record.id, "input": record.input, "output": [{"provenance": provenance}]},
                ensure_ascii=False,
            )
            + "\n"
        )
      count += len(batch)
      bar.update(len(batch))
  bar.close()
  paths.write_text(out_path + ".done", json.dumps({**done, "records": count}))
  return count


def run(
    passages_dir: str,
    kilt_files: Sequence[str],
    out_dir: str,
    k: int = 100,
    batch_size: int = 256,
    threads: int = 0,
    progress: bool = True,
) -> list[str]:
  """Build or load the index, retrieve for each file; returns the output paths."""
  missing = [f for f in kilt_files if not paths.path(f).is_file()]
  if missing:
    raise FileNotFoundError(f"KILT files not found: {', '.join(missing)}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  table = PassageTable(passages_dir)
  paths.makedirs(out_dir)
  index = Bm25Index.load_or_build(table, paths.join(out_dir, INDEX_DIR), progress)
  outputs = []
  for kilt_file in kilt_files:
    outputs.append(output_path(out_dir, kilt_file))
    count = retrieve_file(index, table, kilt_file, outputs[-1], k, batch_size, threads, progress)
    logger.info("%s: %d questions -> %s", kilt_file, count, outputs[-1])
  return outputs


def read_retrieval(path: str, k: int, table: PassageTable) -> Iterator[tuple[str, np.ndarray]]:
  """(record id, int32[k] passage ids, -1 padded) per record of a KILT-format retrieval file.

  Provenance with `passage_id` is taken as is (checked against the table:
  its page must be the entry's `wikipedia_id`). Provenance from elsewhere,
  with `wikipedia_id` and maybe `start_paragraph_id`/`end_paragraph_id`,
  becomes the passages covering that paragraph range, or, without a
  paragraph (page-level retrievers), the page's first passage. Repeats are
  dropped and the first K kept. Anything that does not map is an error
  naming file:line.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  for line, obj in kilt.iter_jsonl(path):

    def bad(reason: str) -> kilt.KiltFormatError:
      return kilt.KiltFormatError(path, line, reason)

    if not isinstance(obj, dict) or "id" not in obj:
      raise bad("record has no 'id'")
    rid = str(obj["id"])
    outputs = obj.get("output") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
      raise bad(f"id {rid}: 'output' must be a list of objects")
    found: dict[int, None] = {}
    for j, prov in enumerate(p for o in outputs for p in (o.get("provenance") or [])):
      if len(found) >= k:
        break
      try:
        found.update(dict.fromkeys(_passage_ids(prov, table)))
      except (KeyError, IndexError, TypeError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        raise bad(f"id {rid}: provenance {j}: {message}") from None
    ids = np.full(k, -1, np.int32)
    top = list(found)[:k]
    ids[: len(top)] = top
    yield rid, ids


def _passage_ids(prov, table: PassageTable) -> list[int]:
  if not isinstance(prov, dict):
    raise TypeError("is not an object")
  wid = prov.get("wikipedia_id")
  if "passage_id" in prov:
    pid = prov["passage_id"]
    if not isinstance(pid, int) or isinstance(pid, bool):
      raise TypeError(f"passage_id {pid!r} is not an integer")
    page_wid = table.page(table.passage_page(pid))[0]
    if wid is not None and str(wid).strip() != page_wid:
      raise ValueError(
          f"passage_id {pid} is on page {page_wid} in {table.directory}, not {wid}: "
          "was this file retrieved from another passage table?"
      )
    return [pid]
  if wid is None:
    raise KeyError("has neither 'passage_id' nor 'wikipedia_id'")
  start, end = prov.get("start_paragraph_id"), prov.get("end_paragraph_id")
  if start is None:
    return [int(table.passages_for(wid)[0])]
  return [int(i) for i in table.passages_for(wid, int(start), None if end is None else int(end))]


def _task_files(data_dir: str, tasks: str, splits: str) -> list[str]:
  return [
      os.path.join(data_dir, kilt.get_task(t).file(s))
      for t in tasks.split(",")
      if t
      for s in splits.split(",")
      if s
  ]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.retrieve", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
      "--passages", required=True, help="passage table directory (lumenvq.data.passages)"
  )
  parser.add_argument("--kilt_files", help="comma-separated KILT jsonl files")
  parser.add_argument("--data_dir", help="directory of KILT files, with --tasks and --splits")
  parser.add_argument("--tasks", help="comma-separated KILT task names, e.g. nq,hotpotqa,fever")
  parser.add_argument("--splits", default="dev", help="comma-separated splits (default dev)")
  parser.add_argument("--out", required=True, help="output directory (index and retrieval files)")
  parser.add_argument("--k", type=int, default=100, help="passages per question")
  parser.add_argument("--batch_size", type=int, default=256, help="questions per BM25 batch")
  parser.add_argument("--threads", type=int, default=0, help="bm25s retrieval threads (0: none)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if bool(args.kilt_files) == bool(args.data_dir):
    parser.error("give either --kilt_files or --data_dir with --tasks")
  try:
    if args.data_dir:
      if not args.tasks:
        parser.error("--data_dir needs --tasks")
      files = _task_files(args.data_dir, args.tasks, args.splits)
    else:
      files = [f for f in args.kilt_files.split(",") if f]
    outputs = run(
        args.passages, files, args.out, args.k, args.batch_size, args.threads, not args.no_progress
    )
  except (OSError, ValueError) as err:  # KiltFormatError and UnknownTaskError are ValueErrors
    parser.exit(1, f"error: {err}\n")
  print("\n".join(outputs))


if __name__ == "__main__":
  main()
