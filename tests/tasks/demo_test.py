"""The demo tasks: names, where their files are found (default, environment, gin), and the trainer's
input pipeline reading them."""

import itertools
import os

import gin
import pytest
import seqio

import tasks
from lumenvq.data import demo, kilt
from lumenvq.training import input_pipeline

LENGTHS = {"inputs": 48, "targets": 12}
NAMES = [
    "lumenvq_demo_nq",
    "lumenvq_demo_hotpotqa",
    "lumenvq_demo_fever",
    "lumenvq_demo_structured_zeroshot",
]


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _ids(name, split="validation"):
  ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split=split, shuffle=False)
  return [e["id"].decode() for e in ds.as_numpy_iterator()]


def _dev_ids(root, task):
  return [r.id for r in kilt.read_kilt(os.path.join(root, task + "-dev-kilt.jsonl"))]


def test_names_splits_and_mixture():
  assert [tasks.demo.task_name(t) for t in demo.TASK_NAMES] == NAMES
  for name in NAMES:
    task = seqio.get_mixture_or_task(name)
    assert task.splits == ("train", "validation", "dev") and task.is_kilt
    assert task.output_features["inputs"].vocabulary is tasks.demo.VOCABULARY
  mixture = seqio.get_mixture_or_task("lumenvq_demo_all")
  assert sorted(t.name for t in mixture.tasks) == sorted(NAMES)
  assert {mixture.get_rate(t) for t in mixture.tasks} == {1.0}
  single_hop = seqio.get_mixture_or_task("lumenvq_demo_single_hop")
  assert sorted(t.name for t in single_hop.tasks) == [
      "lumenvq_demo_nq",
      "lumenvq_demo_structured_zeroshot",
  ]
  with pytest.raises(ValueError, match="unknown demo task 'trex'; demo tasks: nq, hotpotqa, fever"):
    tasks.demo.task_name("trex")


def test_default_data_dir_is_demo_out_data_in_the_working_directory(
    demo_out, monkeypatch, clean_gin
):
  monkeypatch.delenv("LUMENVQ_DEMO_DIR", raising=False)
  monkeypatch.chdir(demo_out.parent)
  settings = tasks.demo.demo_data()
  assert (settings.data_dir, settings.passages_dir) == (
      str(demo_out / "data"),
      str(demo_out / "passages"),
  )
  assert (settings.retrieval_dir, settings.vocabulary_path) == (
      str(demo_out / "retrieval"),
      str(demo_out / "vocab" / "spm.model"),
  )
  assert _ids("lumenvq_demo_hotpotqa") == _dev_ids(demo_out / "data", "hotpotqa")
  monkeypatch.chdir(demo_out)  # no demo_out/data below the working directory
  with pytest.raises(
      FileNotFoundError,
      match=rf"KILT file {demo_out}/demo_out/data/hotpotqa-dev-kilt.jsonl "
      rf"not found .*python -m lumenvq.data.demo --out",
  ):
    _ids("lumenvq_demo_hotpotqa")


def test_environment_then_gin_choose_the_files(demo_out, tmp_path, monkeypatch, clean_gin):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("LUMENVQ_DEMO_DIR", str(demo_out / "data"))
  assert _ids("lumenvq_demo_fever") == _dev_ids(demo_out / "data", "fever")
  # gin wins over the environment, and may move each directory: a copy of the dev file with 3 records.
  os.makedirs(tmp_path / "other")
  with open(demo_out / "data" / "fever-dev-kilt.jsonl") as f, open(
      tmp_path / "other" / "fever-dev-kilt.jsonl", "w"
  ) as out:
    out.writelines(f.readlines()[:3])
  os.makedirs(tmp_path / "retrieval")
  with open(demo_out / "retrieval" / "fever-dev-bm25-kilt.jsonl") as f, open(
      tmp_path / "retrieval" / "fever-dev-bm25-kilt.jsonl", "w"
  ) as out:
    out.writelines(f.readlines()[:3])
  gin.parse_config(f"""
      import tasks
      demo_data.data_dir = '{tmp_path / "other"}'
      demo_data.passages_dir = '{demo_out / "passages"}'
      demo_data.retrieval_dir = '{tmp_path / "retrieval"}'
      demo_data.vocabulary_path = '{demo_out / "vocab" / "spm.model"}'
      demo_data.num_passages = 4
  """)
  ds = seqio.get_mixture_or_task("lumenvq_demo_fever").get_dataset(
      LENGTHS, split="dev", shuffle=False
  )
  examples = list(ds.as_numpy_iterator())
  assert [e["id"].decode() for e in examples] == _dev_ids(demo_out / "data", "fever")[:3]
  assert all(e["passage_ids"].shape == (4,) for e in examples)
  gin.parse_config("demo_data.retrieval_dir = None")  # back to the default: OTHER/../retrieval
  assert len(_ids("lumenvq_demo_fever", "dev")) == 3
  gin.parse_config(f"demo_data.retrieval_dir = '{tmp_path / 'missing'}'")
  with pytest.raises(
      FileNotFoundError, match=rf"retrieval file {tmp_path}/missing/fever-dev-bm25-kilt.jsonl"
  ):
    _ids("lumenvq_demo_fever", "dev")


def test_the_trainers_input_pipeline_reads_the_mixture_and_scores_tasks(demo_out, monkeypatch):
  monkeypatch.setenv("LUMENVQ_DEMO_DIR", str(demo_out / "data"))
  source = input_pipeline.SeqioSource("lumenvq_demo_all", LENGTHS)
  assert source.is_kilt
  # Training streams repeat; each process samples the tasks' examples of its own shard.
  shards = [
      list(
          itertools.islice(source.examples("train", shard_index=i, num_shards=2, repeat=True), 100)
      )
      for i in range(2)
  ]
  ids = [{e["id"] for e in shard} for shard in shards]
  assert not ids[0] & ids[1] and {i.split("-")[1] for i in ids[0]} == set(demo.TASK_NAMES)
  assert all(e["passage_ids"].shape == (20,) and e["passages"].shape == (20,) for e in shards[0])
  for task_source in source.eval_sources():
    examples = list(task_source.examples("validation"))
    targets = [
        task_source.postprocess(e["targets_pretokenized"], e, is_target=True) for e in examples
    ]
    golds = [
        task_source.postprocess(e["targets_pretokenized"], e, is_target=False) for e in examples
    ]
    metric = kilt.get_task(task_source.name.removeprefix("lumenvq_demo_")).metrics[0]
    assert task_source.score(targets, golds)[metric] == 1.0
    assert task_source.score(targets, ["no such answer"] * len(targets))[metric] == 0.0
    decoded = [task_source.decode(e["targets"]) for e in examples]
    assert decoded == [e["targets_pretokenized"] for e in examples]
