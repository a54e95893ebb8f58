"""SeqIO machinery on a tiny demo world: features, the join with retrieval, passage texts, the lazy
vocabulary, postprocessing and KILT metrics, per-host shards, path resolution and its errors."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import seqio

from lumenvq.data import (
    demo,
    kilt,
    passage_table,
    passage_tokens,
    passages,
    retrieve,
    seqio_tasks,
    vocab,
)
from lumenvq.model import reader_models
from lumenvq.training import input_pipeline

RETRIEVED = (
    8  # passages per question in the retrieval files; the tasks read K = 10 (padded with -1)
)
LAYOUT = seqio_tasks.Layout(
    configurable="test_data",
    env_var="SEQIO_TASKS_TEST_DIR",
    default_data_dir=os.path.join("nowhere", "data"),
    root="..",
    data_command="make-data --out {data_dir} --task {task} --split {split}",
)
STATE = {"data_dir": None, "num_passages": 10}
LENGTHS = {"inputs": 64, "targets": 16}


def _settings():
  return seqio_tasks.TaskData.resolve(LAYOUT, STATE["data_dir"], num_passages=STATE["num_passages"])


VOCABULARY = seqio_tasks.LazyVocabulary(_settings)
for _name in ("nq", "fever"):  # registering must not touch the (not yet built) files or vocabulary
  seqio_tasks.register_task(
      f"seqio_tasks_test_{_name}", kilt.get_task(_name), ("train", "dev"), _settings, VOCABULARY
  )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  data = str(root / "data")
  demo.write_demo(data, num_entities=300, train_size=40, dev_size=20)
  _rewrite(
      os.path.join(data, "nq-train-kilt.jsonl"), _add_alias
  )  # the demo's questions have one answer each
  source = os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(root / "passages"), words=28, progress=False)
  vocab.train_sentencepiece(
      source, str(root / "vocab" / "spm"), vocab_size=400, max_sentences=None, threads=1
  )
  files = [
      os.path.join(data, kilt.get_task(t).file(s))
      for t in ("nq", "fever")
      for s in ("train", "dev")
  ]
  retrieve.run(str(root / "passages"), files, str(root / "retrieval"), k=RETRIEVED, progress=False)
  STATE["data_dir"] = data
  yield root
  STATE["data_dir"] = None


def _rewrite(path, change):
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(change(lines))


def _add_alias(lines):
  first = json.loads(lines[0])
  first["output"].append({"answer": "an alias of " + first["output"][0]["answer"]})
  return [json.dumps(first) + "\n"] + lines[1:]


def _examples(name, split="validation", **kwargs):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=LENGTHS, split=split, shuffle=False, **kwargs
  )
  return list(ds.as_numpy_iterator())


def _text(value):
  return value.decode("utf-8")


def test_features_shapes_and_ids(world):
  examples = _examples("seqio_tasks_test_nq")
  records = list(kilt.read_kilt(world / "data" / "nq-dev-kilt.jsonl"))
  assert [_text(e["id"]) for e in examples] == [r.id for r in records] and len(records) == 20
  for e in examples:
    assert set(e) == {
        "id",
        "inputs",
        "inputs_pretokenized",
        "targets",
        "targets_pretokenized",
        "answers",
        "passage_ids",
        "passages",
        "passage_tokens",
    }
    assert e["inputs"].dtype == e["targets"].dtype == e["passage_ids"].dtype == np.int32
    assert e["passage_ids"].shape == e["passages"].shape == (10,)
    assert 1 < len(e["inputs"]) <= LENGTHS["inputs"] and e["inputs"][-1] == VOCABULARY.eos_id
    assert 1 < len(e["targets"]) <= LENGTHS["targets"] and e["targets"][-1] == VOCABULARY.eos_id
  task = seqio.get_mixture_or_task("seqio_tasks_test_nq")
  assert task.is_kilt and task.splits == ("train", "validation", "dev")
  assert [_text(e["id"]) for e in _examples("seqio_tasks_test_nq", "dev")] == [
      r.id for r in records
  ]


def test_passage_ids_are_the_retrieval_files_and_texts_the_tables(world):
  table = passage_table.PassageTable(world / "passages")
  want = list(
      retrieve.read_retrieval(str(world / "retrieval" / "nq-train-bm25-kilt.jsonl"), 10, table)
  )
  examples = _examples("seqio_tasks_test_nq", "train")
  assert len(examples) == len(want) == 40
  for e, (rid, ids) in zip(examples, want):
    assert _text(e["id"]) == rid
    np.testing.assert_array_equal(e["passage_ids"], ids)
    assert (ids[:RETRIEVED] >= 0).all() and (ids[RETRIEVED:] == -1).all()
    assert [_text(p) for p in e["passages"]] == [table.text(i) for i in ids[:RETRIEVED]] + [""] * 2
    tokens = e["passage_tokens"]
    assert tokens.dtype == np.int32 and tokens.shape[0] == 10 and not tokens[RETRIEVED:].any()
    for row, pid in zip(tokens[:RETRIEVED], ids):
      length = np.count_nonzero(row)
      assert row[length - 1] == VOCABULARY.eos_id and not row[length:].any()
      assert VOCABULARY.decode(row.tolist()) == table.text(pid)
    assert np.count_nonzero(tokens, axis=1).max() == tokens.shape[1]  # padded to the longest only


def test_pretokenized_passages_give_the_same_examples(world):
  """Built at their default place, the passages' tokens are looked up, not tokenized, and
  every feature of every example is what tokenizing gave (K = 10 with 8 retrieved: -1 ids)."""
  settings = _settings()
  tokenized = _examples("seqio_tasks_test_nq", "train")
  assert settings.passage_tokens(settings.passage_table()) is None
  passage_tokens.build(settings.passages_dir, settings.vocabulary_path, progress=False)
  try:
    assert settings.passage_tokens(settings.passage_table()) is not None
    looked_up = _examples("seqio_tasks_test_nq", "train")
  finally:
    shutil.rmtree(passage_tokens.default_dir(settings.passages_dir, settings.vocabulary_path))
  assert len(looked_up) == len(tokenized) == 40
  for a, b in zip(looked_up, tokenized):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_set_passage_tokens_dir_must_hold_built_tokens(world, tmp_path):
  settings = seqio_tasks.TaskData.resolve(
      LAYOUT, STATE["data_dir"], passage_tokens_dir=str(tmp_path / "none")
  )
  with pytest.raises(
      FileNotFoundError,
      match=r"none holds no finished passage tokens .* \(set gin test_data.passage_tokens_dir",
  ):
    settings.passage_tokens(settings.passage_table())


def test_without_passage_texts_examples_keep_ids_and_drop_texts_and_tokens(world):
  full = _examples("seqio_tasks_test_nq", "train")
  with seqio_tasks.without_passage_texts():
    bare = _examples("seqio_tasks_test_nq", "train")
  assert len(bare) == len(full) == 40
  for b, f in zip(bare, full):
    assert set(f) - set(b) == {"passages", "passage_tokens"} and set(b) <= set(f)
    for key in b:
      np.testing.assert_array_equal(b[key], f[key], err_msg=key)
  assert "passages" in _examples("seqio_tasks_test_nq", "train")[0]  # the block ended


def test_a_stored_memory_training_stream_reads_no_texts_and_the_same_ids(world):
  """The input pipeline builds examples without passage texts for a converter that reads
  passage ids; its batches are those of the full stream, passage tokens aside."""
  source = input_pipeline.SeqioSource("seqio_tasks_test_nq", LENGTHS, task_modules=())
  layout = input_pipeline.DataLayout(8, 0, 8)

  def batches(passage_ids):
    convert = reader_models.ReaderFeatureConverter(LENGTHS, 10, 16, passage_ids=passage_ids)
    stream = input_pipeline.train_batches(source, convert, layout, 0, shuffle=True, seed=3)
    return list(itertools.islice(stream, 6)), convert

  by_id, convert = batches(True)
  by_tokens, _ = batches(False)
  assert not convert.reads_passage_texts
  examples = source.examples("train", shuffle=True, seed=3, repeat=True)
  seen = [e["passage_ids"] for e in itertools.islice(examples, 6 * 8)]
  for step, (got, full) in enumerate(zip(by_id, by_tokens)):
    for key in set(got) - {"passage_ids"}:
      np.testing.assert_array_equal(got[key], full[key], err_msg=key)
    np.testing.assert_array_equal(got["passage_ids"], np.stack(seen[step * 8 : step * 8 + 8]))


def test_prefix_targets_and_answers(world, monkeypatch):
  records = {r.id: r for r in kilt.read_kilt(world / "data" / "nq-train-kilt.jsonl")}
  assert (
      len(records["demo-nq-train-0"].answers) == 2
  )  # the first answer is the target; all are kept
  for e in _examples("seqio_tasks_test_nq", "train"):
    record = records[_text(e["id"])]
    assert _text(e["inputs_pretokenized"]) == "question: " + record.input
    assert VOCABULARY.decode(e["inputs"].tolist()) == "question: " + record.input
    assert _text(e["targets_pretokenized"]) == record.answers[0]
    assert json.loads(e["answers"]) == list(record.answers)
  fever = _examples("seqio_tasks_test_fever")
  assert all(_text(e["inputs_pretokenized"]).startswith("claim: ") for e in fever)
  assert {_text(e["targets_pretokenized"]) for e in fever} == {"SUPPORTS", "REFUTES"}
  monkeypatch.setitem(STATE, "num_passages", 3)  # K below the file's 8: the best 3
  first = _examples("seqio_tasks_test_fever")[0]
  np.testing.assert_array_equal(first["passage_ids"], fever[0]["passage_ids"][:3])


def test_postprocess_and_metrics_score_gold_answers_one_and_wrong_ones_zero(world):
  task = seqio.get_mixture_or_task("seqio_tasks_test_nq")
  examples = _examples("seqio_tasks_test_nq")
  targets = [
      task.postprocess_fn(_text(e["targets_pretokenized"]), example=e, is_target=True)
      for e in examples
  ]
  assert targets == [list(r.answers) for r in kilt.read_kilt(world / "data" / "nq-dev-kilt.jsonl")]
  [metric] = task.predict_metric_fns
  gold = [task.postprocess_fn(t[-1], example=e) for t, e in zip(targets, examples)]
  assert metric(targets, gold) == {"em": 1.0, "f1": 1.0}
  assert metric(targets, ["zzz qqq"] * len(targets)) == {"em": 0.0, "f1": 0.0}
  # Max over the gold answers, and the KILT scorer's normalisation for EM (not for accuracy).
  assert metric([["Paris", "City of Light"]], ["the city of light!"]) == {"em": 1.0, "f1": 1.0}
  assert seqio_tasks.downstream_metrics([["Paris"]], ["paris"], ("accuracy", "em")) == {
      "accuracy": 0.0,
      "em": 1.0,
  }
  assert seqio_tasks.downstream_metrics(["Paris", "Rome"], ["Paris", ""], ("em",)) == {"em": 0.5}
  [fever_metric] = seqio.get_mixture_or_task("seqio_tasks_test_fever").predict_metric_fns
  assert fever_metric([["SUPPORTS"], ["REFUTES"]], ["SUPPORTS", "SUPPORTS"]) == {"accuracy": 0.5}
  with pytest.raises(ValueError, match="'answers' feature"):
    task.postprocess_fn("x", example={"id": b"1"}, is_target=True)
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metric([["a"], ["b"]], ["a"])


def test_host_shards_partition_the_split(world):
  whole = [_text(e["id"]) for e in _examples("seqio_tasks_test_nq", "train")]
  shards = [
      [
          _text(e["id"])
          for e in _examples("seqio_tasks_test_nq", "train", shard_info=seqio.ShardInfo(i, 2))
      ]
      for i in range(2)
  ]
  assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(whole)
  assert len(shards[0]) == len(shards[1]) == 20


def test_settings_come_from_arguments_then_environment_then_default(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(LAYOUT.env_var, raising=False)
  default = seqio_tasks.TaskData.resolve(LAYOUT)
  assert default.data_dir == str(tmp_path / "nowhere" / "data")
  assert default.passages_dir == str(tmp_path / "nowhere" / "passages")
  assert default.retrieval_dir == str(tmp_path / "nowhere" / "retrieval")
  assert default.vocabulary_path == str(tmp_path / "nowhere" / "vocab" / "spm.model")
  assert default.num_passages == seqio_tasks.DEFAULT_NUM_PASSAGES
  monkeypatch.setenv(LAYOUT.env_var, "env/data")
  assert seqio_tasks.TaskData.resolve(LAYOUT).passages_dir == str(tmp_path / "env" / "passages")
  given = seqio_tasks.TaskData.resolve(
      LAYOUT, "given", vocabulary_path="gs://bucket/t5.model", num_passages=5
  )
  assert (given.data_dir, given.vocabulary_path, given.num_passages) == (
      str(tmp_path / "given"),
      "gs://bucket/t5.model",
      5,
  )
  assert seqio_tasks.TaskData.resolve(LAYOUT, retrieval_dir="r").retrieval_dir == str(
      tmp_path / "r"
  )
  with pytest.raises(ValueError, match="test_data.num_passages must be a positive integer, got 0"):
    seqio_tasks.TaskData.resolve(LAYOUT, num_passages=0)


def test_missing_files_name_the_path_and_the_command_that_makes_it(world, tmp_path, monkeypatch):
  for part in ("data", "passages", "retrieval", "vocab"):
    shutil.copytree(world / part, tmp_path / part)
  monkeypatch.setitem(STATE, "data_dir", str(tmp_path / "data"))
  os.remove(tmp_path / "retrieval" / "nq-train-bm25-kilt.jsonl")
  with pytest.raises(
      FileNotFoundError,
      match=(
          rf"retrieval file {tmp_path}/retrieval/nq-train-bm25-kilt.jsonl not found .*python -m "
          rf"lumenvq.data.retrieve --passages {tmp_path}/passages --data_dir {tmp_path}/data --tasks nq "
          rf"--splits train --out {tmp_path}/retrieval --k 10"
      ),
  ):
    _examples("seqio_tasks_test_nq", "train")
  assert len(_examples("seqio_tasks_test_nq", "dev")) == 20  # the other split is still there
  os.remove(tmp_path / "data" / "nq-dev-kilt.jsonl")
  with pytest.raises(
      FileNotFoundError,
      match=rf"KILT file {tmp_path}/data/nq-dev-kilt.jsonl not found "
      rf"\(from gin test_data.data_dir, else \$SEQIO_TASKS_TEST_DIR.*"
      rf"make-data --out {tmp_path}/data --task nq --split dev",
  ):
    _examples("seqio_tasks_test_nq", "dev")
  os.remove(tmp_path / "vocab" / "spm.model")
  with pytest.raises(
      FileNotFoundError,
      match=rf"SentencePiece model {tmp_path}/vocab/spm.model not found.*"
      rf"python -m lumenvq.data.train_vocab .*--out {tmp_path}/vocab/spm",
  ):
    _examples("seqio_tasks_test_fever", "dev")
  shutil.rmtree(tmp_path / "passages")
  with pytest.raises(
      FileNotFoundError,
      match=rf"{tmp_path}/passages is not a finished passage table.*"
      rf"python -m lumenvq.data.passages --knowledge_source "
      rf"{tmp_path}/data/kilt_knowledgesource.json --out {tmp_path}/passages",
  ):
    _examples("seqio_tasks_test_fever", "dev")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda lines: [lines[0], lines[2], lines[1]] + lines[3:],
            r"nq-dev-kilt.jsonl:2: id demo-nq-dev-1, but line 2 of .*nq-dev-bm25-kilt.jsonl has id demo-nq-dev-2",
        ),
        (
            lambda lines: lines[:5]
            + ["\n"]
            + lines[6:],  # a blank line: record 5 is missing, later lines shift
            r"nq-dev-kilt.jsonl:6: id demo-nq-dev-5, but line 7 of .*nq-dev-bm25-kilt.jsonl has id demo-nq-dev-6",
        ),
        (
            lambda lines: lines[:-1],
            r"nq-dev-kilt.jsonl:20: id demo-nq-dev-19 has no retrieval: .*nq-dev-bm25-kilt.jsonl ends after 19 records",
        ),
        (
            lambda lines: lines + [lines[0].replace("demo-nq-dev-0", "extra-id")],
            r"nq-dev-bm25-kilt.jsonl:21: id extra-id is not in .*nq-dev-kilt.jsonl, which ends after 20 records",
        ),
    ],
)
def test_a_missing_or_mismatched_id_names_both_files_and_the_line(world, tmp_path, change, message):
  shutil.copy(world / "retrieval" / "nq-dev-bm25-kilt.jsonl", tmp_path)
  _rewrite(tmp_path / "nq-dev-bm25-kilt.jsonl", change)
  table = passage_table.PassageTable(world / "passages")
  joined = seqio_tasks.joined_records(
      str(world / "data" / "nq-dev-kilt.jsonl"), str(tmp_path / "nq-dev-bm25-kilt.jsonl"), table, 10
  )
  with pytest.raises(kilt.KiltFormatError, match=message):
    list(joined)


def test_lazy_vocabulary_is_the_named_models(world, tmp_path, monkeypatch):
  model = vocab.get_vocabulary(str(world / "vocab" / "spm.model"))
  text = "Kunbri Society was founded in 1944."
  assert (
      VOCABULARY.encode(text) == model.encode(text)
      and VOCABULARY.vocab_size == model.vocab_size == 500
  )
  assert VOCABULARY.decode(model.encode(text) + [1, 7]) == model.decode(model.encode(text)) == text
  assert list(VOCABULARY.encode_tf(text).numpy()) == model.encode(text)
  assert (VOCABULARY.eos_id, VOCABULARY.pad_id, VOCABULARY.unk_id) == (1, 0, 2)
  monkeypatch.setitem(STATE, "data_dir", str(tmp_path / "data"))  # resolved again on every use
  with pytest.raises(
      FileNotFoundError, match=rf"SentencePiece model {tmp_path}/vocab/spm.model not found"
  ):
    VOCABULARY.encode(text)
