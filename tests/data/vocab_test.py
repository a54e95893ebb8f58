"""SentencePiece training on a small knowledge source: T5 ids, byte fallback, round trips, sampling."""

import json
import os
import random

import pytest
import sentencepiece as spm

from lumenvq import paths
from lumenvq.data import kilt, train_vocab, vocab

SYLLABLES = "ka ri mo ten sul par vi lor an dem ush gra fel om tiq ber nos hal cu ze".split()


def _word(rng):
  return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  rng = random.Random(0)
  path = tmp_path_factory.mktemp("ks") / "ks.json"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(120):
      words = [_word(rng) for _ in range(40)]
      paragraphs = [
          f"Page{i} café\n",
          " ".join(words[:20]) + f". The {words[20]} of {i}! Next one.\n",
          "Section::::Early life.\n",
          "BULLET::::- " + " ".join(words[21:]) + ".\n",
      ]
      f.write(
          json.dumps(
              {"wikipedia_id": str(i), "wikipedia_title": f"Page{i} café", "text": paragraphs},
              ensure_ascii=False,
          )
          + "\n"
      )
  return str(path)


def test_sentence_iterator_removes_markup_and_samples_the_whole_file(source):
  first = list(vocab.sentence_iterator(source))[:5]
  assert first[0] == "Page0 café" and first[2].startswith("The ") and first[2].endswith(" of 0!")
  assert first[1].count(" ") == 19 and first[3] == "Next one."
  assert first[4] == "Early life."
  everything = list(vocab.sentence_iterator(source))
  assert len(everything) == 120 * 6 and not any("::::" in s for s in everything)
  sample = list(vocab.sentence_iterator(source, max_sentences=400, windows=20))  # 4 runs of 100
  assert len(sample) == 400 and len(set(sample)) > 250
  pages = sorted(int(s[4:-5]) for s in sample if s.endswith(" café"))
  assert (
      pages[0] == 0 and pages[-1] > 100 and len(pages) < 90
  )  # spread over the file, not all of it


def test_train_special_ids_byte_fallback_and_round_trip(source, tmp_path):
  model = vocab.train_sentencepiece(
      source, str(tmp_path / "spm"), vocab_size=400, max_sentences=None
  )
  assert model == str(tmp_path / "spm.model") and os.path.exists(tmp_path / "spm.vocab")
  assert sorted(os.listdir(tmp_path)) == ["spm.model", "spm.vocab"]
  sp = spm.SentencePieceProcessor(model_file=model)
  assert sp.get_piece_size() == 400
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  text = "The karimo tensul near the parvi — 漢字 ünïcode"
  ids = sp.encode(text)
  assert 2 not in ids  # byte fallback: nothing is unknown
  assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
  assert sp.decode(ids) == text
  sentence = list(vocab.sentence_iterator(source))[1]
  assert len(sp.encode(sentence)) < len(sentence) / 2  # corpus words are pieces, not characters


def test_get_vocabulary_returns_seqio_vocabulary_and_checks_ids(source, tmp_path):
  model = vocab.train_sentencepiece(
      source, str(tmp_path / "spm"), vocab_size=400, max_sentences=300
  )
  vocabulary = vocab.get_vocabulary(model, extra_ids=10)
  assert type(vocabulary).__name__ == "SentencePieceVocabulary"
  assert vocabulary.vocab_size == 410 and (
      vocabulary.pad_id,
      vocabulary.eos_id,
      vocabulary.unk_id,
  ) == (0, 1, 2)
  assert vocabulary.decode(vocabulary.encode("the karimo ünï")) == "the karimo ünï"
  with pytest.raises(FileNotFoundError, match="missing.model not found"):
    vocab.get_vocabulary(str(tmp_path / "missing.model"))
  # A model with SentencePiece's default ids (unk=0, bos=1, eos=2) is not T5-style.
  spm.SentencePieceTrainer.train(
      sentence_iterator=vocab.sentence_iterator(source),
      model_prefix=str(tmp_path / "d"),
      vocab_size=100,
      minloglevel=2,
  )
  with pytest.raises(ValueError, match=r"d\.model has pad=-1 eos=2"):
    vocab.get_vocabulary(str(tmp_path / "d.model"))


def test_cli_and_bad_input(source, tmp_path, capsys):
  train_vocab.main(
      [
          "--knowledge_source",
          source,
          "--out",
          str(tmp_path / "v" / "spm"),
          "--vocab_size",
          "350",
          "--max_sentences",
          "200",
      ]
  )
  assert capsys.readouterr().out.strip() == str(tmp_path / "v" / "spm.model")
  bad = tmp_path / "bad.json"
  bad.write_text(
      open(source).readline() + '{"wikipedia_id": "x", "wikipedia_title": "X", "text": []}\n'
  )
  with pytest.raises(kilt.KiltFormatError, match=r"bad\.json:2: page x has no text"):
    vocab.train_sentencepiece(str(bad), str(tmp_path / "b"), vocab_size=300, max_sentences=None)
  assert not [n for n in os.listdir(tmp_path) if n.startswith("b.")]


def test_bpe_on_task_texts_learns_question_words(source, tmp_path):
  tasks = tmp_path / "nq-train-kilt.jsonl"
  tasks.write_text(
      "".join(
          json.dumps(
              {
                  "id": str(i),
                  "input": "whereabouts did zorbflux live?",
                  "output": [{"answer": "Qwoxland"}],
              }
          )
          + "\n"
          for i in range(50)
      )
  )
  assert list(vocab.task_texts([str(tasks)]))[:2] == ["whereabouts did zorbflux live?", "Qwoxland"]

  def pieces(kilt_files, name):
    model = vocab.train_sentencepiece(
        source,
        str(tmp_path / name),
        vocab_size=400,
        max_sentences=None,
        model_type="bpe",
        kilt_files=kilt_files,
    )
    return len(spm.SentencePieceProcessor(model_file=model).encode("zorbflux Qwoxland"))

  assert pieces([str(tasks)], "with") < pieces([], "without")  # words only the task file has


def test_a_vocabulary_trained_from_and_to_gs_equals_the_local_one(source, gcs_bucket, tmp_path):
  """Knowledge source and output prefix on the local Cloud Storage server: trained on local
  disk, uploaded .vocab then .model, and read back by seqio through the path layer."""
  prefix = f"{gcs_bucket}/vocab-{os.getpid()}"
  paths.upload(source, f"{prefix}/ks.json")
  local = vocab.train_sentencepiece(source, str(tmp_path / "spm"), vocab_size=400)
  remote = vocab.train_sentencepiece(f"{prefix}/ks.json", f"{prefix}/spm", vocab_size=400)
  assert remote == f"{prefix}/spm.model"
  # The .model differs only in the trainer's model_prefix (a temporary name); pieces and scores:
  assert paths.path(f"{prefix}/spm.vocab").read_bytes() == open(tmp_path / "spm.vocab", "rb").read()
  text = "The karimo tensul near the parvi"
  assert vocab.get_vocabulary(remote).encode(text) == vocab.get_vocabulary(local).encode(text)
