"""The KILT tasks: one per task of the registry, their splits and metrics, and the KILT directory
layout read through $KILT_DATA_DIR (the demo world's files, laid out as KILT's)."""

import os

import pytest
import seqio

import tasks
from lumenvq.data import kilt
from lumenvq.training import input_pipeline

LENGTHS = {"inputs": 48, "targets": 12}


def test_every_kilt_task_is_registered_with_its_splits_and_metrics():
  assert [tasks.kilt.task_name(t) for t in kilt.TASKS] == [f"kilt_{t}" for t in kilt.TASKS]
  for name, task in kilt.TASKS.items():
    registered = seqio.get_mixture_or_task(f"kilt_{name}")
    assert registered.is_kilt and input_pipeline._is_kilt_name(registered.name)
    want = (
        ("train", "validation", "dev", "test")
        if "train" in task.files
        else ("validation", "dev", "test")
    )
    assert registered.splits == want
    [metric] = registered.predict_metric_fns
    assert set(metric([["gold answer"]], ["gold answer"])) == set(task.metrics)
  mixture = seqio.get_mixture_or_task("kilt_all")
  assert sorted(t.name for t in mixture.tasks) == sorted(f"kilt_{t}" for t in kilt.TASKS)
  assert {mixture.get_rate(t) for t in mixture.tasks} == {1.0}


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(
      kilt.UnknownTaskError, match="unknown KILT task 'natural_questions'; known tasks: fever, "
  ):
    tasks.kilt.task_name("natural_questions")


@pytest.fixture
def kilt_dir(demo_out, tmp_path, monkeypatch):
  """DIR with the KILT files, DIR/passages, DIR/retrieval, DIR/vocab (links into the demo world)."""
  for name in os.listdir(demo_out / "data"):
    os.symlink(demo_out / "data" / name, tmp_path / name)
  for part in ("passages", "retrieval", "vocab"):
    os.symlink(demo_out / part, tmp_path / part)
  monkeypatch.setenv("KILT_DATA_DIR", str(tmp_path))
  monkeypatch.chdir(demo_out)
  return tmp_path


def test_kilt_layout_from_the_environment(kilt_dir, demo_out):
  settings = tasks.kilt.kilt_data()
  assert (settings.data_dir, settings.passages_dir) == (str(kilt_dir), str(kilt_dir / "passages"))
  assert (
      settings.vocabulary_path == str(kilt_dir / "vocab" / "spm.model")
      and settings.num_passages == 20
  )
  ds = seqio.get_mixture_or_task("kilt_structured_zeroshot").get_dataset(
      LENGTHS, split="validation", shuffle=False
  )
  examples = list(ds.as_numpy_iterator())
  records = list(kilt.read_kilt(kilt_dir / "structured_zeroshot-dev-kilt.jsonl"))
  assert [e["id"].decode() for e in examples] == [r.id for r in records]
  assert examples[0]["inputs_pretokenized"].decode() == "relation: " + records[0].input


def test_missing_kilt_files_name_the_download_command(kilt_dir):
  with pytest.raises(
      FileNotFoundError,
      match=rf"KILT file {kilt_dir}/trex-train-kilt.jsonl not found \(from gin "
      rf"kilt_data.data_dir, else \$KILT_DATA_DIR, else kilt\); make it with: "
      rf"python -m lumenvq.data.download_kilt --tasks trex --splits train "
      rf"--out {kilt_dir}$",
  ):
    seqio.get_mixture_or_task("kilt_trex").get_dataset(LENGTHS, split="train")
  with pytest.raises(
      FileNotFoundError,
      match=r"--splits dev .*restore_triviaqa --kilt_file "
      rf"{kilt_dir}/triviaqa-dev_id-kilt.jsonl .*--out "
      rf"{kilt_dir}/triviaqa-dev-kilt.jsonl",
  ):
    seqio.get_mixture_or_task("kilt_triviaqa").get_dataset(LENGTHS, split="validation")
