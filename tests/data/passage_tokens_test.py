"""Pre-tokenized passages: equal to the tasks' tokenizer for every passage, resumable and
committed last, refused for another table or vocabulary, and the same on gs://."""

import os
import shutil

import numpy as np
import pytest
import seqio
import tensorflow as tf

from lumenvq import paths
from lumenvq.data import demo, kilt, passage_table, passage_tokens, passages, seqio_tasks, vocab


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(passage table of 3 shards, SentencePiece model path) over a small demo world."""
  root = tmp_path_factory.mktemp("corpus")
  demo.write_demo(str(root / "data"), num_entities=80, train_size=4, dev_size=2)
  source = str(root / "data" / kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(root / "passages"), num_shards=3, words=20, progress=False)
  model = vocab.train_sentencepiece(
      source, str(root / "spm"), vocab_size=450, max_sentences=None, threads=1
  )
  return passage_table.PassageTable(root / "passages"), model


def _tasks_tokens(table, model, ids):
  """`passage_tokens` as the SeqIO tasks make them from texts (`tokenize_passages`)."""
  ds = tf.data.Dataset.from_tensors(
      {"passage_ids": ids.astype(np.int32), "passages": table.texts(ids).astype(bytes)}
  )
  features = {"inputs": seqio.Feature(vocab.get_vocabulary(model))}
  return next(seqio_tasks.tokenize_passages(ds, features).as_numpy_iterator())["passage_tokens"]


def test_every_passage_equals_the_tasks_tokenizer(corpus, tmp_path):
  table, model = corpus
  manifest = passage_tokens.build(table.directory, model, str(tmp_path / "t"), progress=False)
  assert manifest["num_passages"] == len(table) > 100 and len(manifest["shards"]) == 3
  assert manifest["dtype"] == "uint16"  # 450 ids
  tokens = passage_tokens.PassageTokens(str(tmp_path / "t"), table, model)
  eos = vocab.get_vocabulary(model).eos_id
  for first in range(0, len(table), 40):
    ids = np.arange(first, min(first + 40, len(table)))
    np.testing.assert_array_equal(tokens.lookup(ids, eos), _tasks_tokens(table, model, ids))
  mixed = np.array([len(table) - 1, -1, 0, 0, -1])  # shards in any order, repeats, none
  np.testing.assert_array_equal(tokens.lookup(mixed, eos), _tasks_tokens(table, model, mixed))
  assert tokens.lookup(np.full((2, 3), -1), eos).shape == (2, 3, 1)
  assert manifest["num_tokens"] == sum(
      len(vocab.get_vocabulary(model).encode(t)) for t in table.iter_texts()
  )


def test_the_default_place_is_per_vocabulary_beside_the_table(corpus):
  table, model = corpus
  place = passage_tokens.default_dir(table.directory, model)
  sha = passage_tokens.vocabulary_sha256(model)
  assert place == os.path.join(table.directory, "tokens", sha[:16])
  assert passage_tokens.command(table.directory, model) == (
      f"python -m lumenvq.data.passage_tokens --passages {table.directory} --vocabulary {model}"
  )


def test_a_rerun_rebuilds_only_unfinished_shards_and_the_manifest_comes_last(corpus, tmp_path):
  table, model = corpus
  out = str(tmp_path / "t")
  passage_tokens.build(table.directory, model, out, progress=False)
  shards = sorted(os.listdir(os.path.join(out, "shards")))
  kept = {s: os.stat(os.path.join(out, "shards", s, "tokens.bin")).st_ino for s in shards}
  # A build killed after its first shard: no manifest, the second shard without its marker.
  os.remove(os.path.join(out, "manifest.json"))
  os.remove(os.path.join(out, "shards", shards[1], passage_tokens.SHARD_STATS))
  with pytest.raises(
      FileNotFoundError,
      match="no finished passage tokens .* build them with: "
      "python -m lumenvq.data.passage_tokens --passages",
  ):
    passage_tokens.PassageTokens(out, table, model)
  passage_tokens.build(table.directory, model, out, progress=False)
  inodes = {s: os.stat(os.path.join(out, "shards", s, "tokens.bin")).st_ino for s in shards}
  assert [inodes[s] == kept[s] for s in shards] == [True, False, True]
  ids = np.arange(len(table))
  np.testing.assert_array_equal(
      passage_tokens.PassageTokens(out, table, model).lookup(ids, 1),
      _tasks_tokens(table, model, ids),
  )


def test_tokens_of_another_table_or_vocabulary_are_refused(corpus, tmp_path):
  table, model = corpus
  out = str(tmp_path / "t")
  passage_tokens.build(table.directory, model, out, progress=False)
  other_model = str(tmp_path / "other.model")
  shutil.copy(model, other_model)
  with open(other_model, "ab") as f:
    f.write(b"\0")  # another file: another sha256
  with pytest.raises(ValueError, match=r"does not belong .*'vocabulary_sha256'.* rebuild it with"):
    passage_tokens.PassageTokens(out, table, other_model)
  source = os.path.join(os.path.dirname(table.directory), "data", kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(tmp_path / "p"), words=30, progress=False)
  other_table = passage_table.PassageTable(tmp_path / "p")
  with pytest.raises(ValueError, match=r"'passages_fingerprint': '" + table.fingerprint):
    passage_tokens.PassageTokens(out, other_table, model)


def test_ids_out_of_range_name_the_id(corpus, tmp_path):
  table, model = corpus
  passage_tokens.build(table.directory, model, str(tmp_path / "t"), progress=False)
  tokens = passage_tokens.PassageTokens(str(tmp_path / "t"), table, model)
  with pytest.raises(IndexError, match=rf"passage id {len(table)} is out of range: .* holds"):
    tokens.lookup(np.array([0, len(table)]), 1)
  with pytest.raises(IndexError, match="passage id -2 is out of range"):
    tokens.lookup(np.array([-2]), 1)


def test_tokens_built_on_gs_equal_the_local_ones(corpus, gcs_bucket, tmp_path):
  table, model = corpus
  local = str(tmp_path / "t")
  remote = f"{gcs_bucket}/passage-tokens-{os.getpid()}"
  passage_tokens.build(table.directory, model, local, progress=False)
  passage_tokens.build(table.directory, model, remote, progress=False)
  assert paths.path(remote, "manifest.json").exists()
  ids = np.array([[3, -1, len(table) - 1], [0, 1, 2]])
  np.testing.assert_array_equal(
      passage_tokens.PassageTokens(remote, table, model).lookup(ids, 1),
      passage_tokens.PassageTokens(local, table, model).lookup(ids, 1),
  )
