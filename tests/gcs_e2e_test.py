"""Every path on gs://, against the local Cloud Storage server of the `gcs_bucket` fixture:
train -> checkpoints, config and TensorBoard events -> eval (metrics JSON, predictions,
events) and infer, all read back from the server."""

import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from lumenvq import paths
from lumenvq.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
COMMIT_FILE = "commit_success.txt"  # orbax's marker of a finished step on gs://


def _env(tmp_path_factory):
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


def _cli(env, module, model_dir, *extra):
  command = [
      sys.executable,
      "-m",
      f"lumenvq.{module}",
      *extra,
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.get_source.backend='numpy'",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def trained(gcs_bucket, tmp_path_factory):
  env = _env(tmp_path_factory)
  model_dir = f"{gcs_bucket}/train-{uuid.uuid4().hex[:8]}"
  _cli(
      env,
      "train",
      model_dir,
      "--gin_file=gin_configs/debug/tiny_train.gin",
      f"--gin.TRAIN_STEPS={STEPS}",
      "--gin.train.eval_every=0",
      "--gin.MetricsLogger.log_every=1",
      "--gin.Checkpointer.save_every=2",
  )
  return env, model_dir


def _event_files(directory):
  return [p for p in paths.path(directory).iterdir() if p.name.startswith("events.out.tfevents")]


def test_train_writes_checkpoints_config_and_events_to_the_bucket(trained):
  _, model_dir = trained
  root = paths.path(model_dir)
  steps = sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  assert "TRAIN_STEPS" in (root / "config.gin").read_text()
  assert _event_files(root / "train") and all(
      f.stat().length > 0 for f in _event_files(root / "train")
  )


def test_eval_and_infer_read_the_bucket_and_write_to_it(trained):
  env, model_dir = trained
  common = ["--gin_file=gin_configs/debug/tiny_task.gin", "--gin.MESH_SHAPE=(1, 2)"]
  _cli(
      env,
      "eval",
      model_dir,
      "--gin_file=gin_configs/runs/eval.gin",
      *common,
      "--gin.evaluate.max_examples=8",
  )
  eval_dir = paths.path(model_dir) / "eval"
  report = json.loads((eval_dir / f"metrics_{STEPS}.json").read_text())
  assert report["step"] == STEPS and report["metrics"]["examples"] == 8
  lines = (eval_dir / f"lumenvq_debug_copy-validation-{STEPS}.jsonl").read_text().splitlines()
  assert len(lines) == 8 and {"inputs", "prediction", "targets"} <= set(json.loads(lines[0]))
  assert _event_files(eval_dir)
  _cli(
      env,
      "infer",
      model_dir,
      "--gin_file=gin_configs/runs/infer.gin",
      *common,
      "--gin.infer.max_examples=8",
  )
  infer = paths.path(model_dir) / "infer" / f"lumenvq_debug_copy-validation-{STEPS}.jsonl"
  assert len(infer.read_text().splitlines()) == 8


def test_a_train_killed_mid_save_resumes_from_the_last_committed_step(gcs_bucket, tmp_path_factory):
  """SIGKILL while step 4 is being written (its objects there, its commit marker not yet):
  the latest step found is 2, and a rerun resumes from it and finishes."""
  env = _env(tmp_path_factory)
  model_dir = f"{gcs_bucket}/killed-{uuid.uuid4().hex[:8]}"
  flags = [
      "--gin_file=gin_configs/debug/tiny_train.gin",
      "--gin.TRAIN_STEPS=6",
      "--gin.train.eval_every=0",
      "--gin.Checkpointer.save_every=2",
  ]
  command = [sys.executable, "-m", "lumenvq.train", *flags, f"--gin.MODEL_DIR='{model_dir}'"]
  command.append("--gin.get_source.backend='numpy'")
  step_4 = paths.path(model_dir) / "checkpoints" / "4"
  proc = subprocess.Popen(
      command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  try:
    deadline = time.monotonic() + 240
    while not (step_4.exists() and list(step_4.iterdir())):
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, "step 4 never started"
      time.sleep(0.02)
    proc.kill()
  finally:
    proc.kill()
    proc.wait()
  if (step_4 / COMMIT_FILE).exists():
    pytest.fail("step 4 was committed before the kill landed: nothing half-written to check")
  checkpointer = checkpoints.Checkpointer(paths.join(model_dir, "checkpoints"))
  assert checkpointer.latest_step() == 2
  checkpointer.close()
  result = _cli(env, "train", model_dir, *flags)
  assert "continuing from step 2" in result.stderr
  checkpointer = checkpoints.Checkpointer(paths.join(model_dir, "checkpoints"))
  assert checkpointer.latest_step() == 6 and (step_4 / COMMIT_FILE).exists()
  checkpointer.close()


def _upload(local_dir, remote_dir):
  for root, _, files in os.walk(local_dir):
    for name in files:
      local = os.path.join(root, name)
      remote = paths.join(remote_dir, os.path.relpath(local, local_dir))
      paths.write_bytes(remote, open(local, "rb").read())


@pytest.fixture(scope="module")
def demo_world(gcs_bucket, tmp_path_factory):
  """A small demo world (KILT files, passage table, vocabulary, retrieval files) built
  locally and uploaded: (local root, gs:// root)."""
  from lumenvq.data import demo, kilt, passages, retrieve, vocab  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("world")
  data = str(root / "data")
  demo.write_demo(data, num_entities=100, train_size=8, dev_size=6)
  source = os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(root / "passages"), words=12, progress=False)
  vocab.train_sentencepiece(
      source, str(root / "vocab" / "spm"), vocab_size=400, max_sentences=None, threads=1
  )
  nq = kilt.get_task("nq")
  files = [os.path.join(data, nq.file(s)) for s in ("train", "dev")]
  retrieve.run(str(root / "passages"), files, str(root / "retrieval"), k=4, progress=False)
  remote = f"{gcs_bucket}/world-{uuid.uuid4().hex[:8]}"
  _upload(str(root), remote)
  return str(root), remote


def test_task_data_on_gs_reads_as_the_local_copy(demo_world):
  """KILT files, retrieval files, the passage table (ranged reads) and the vocabulary,
  read from gs:// through the path layer, give the local copy's examples and tokens."""
  from lumenvq.data import kilt, seqio_tasks  # pylint: disable=g-import-not-at-top
  from lumenvq.data.passage_table import PassageTable  # pylint: disable=g-import-not-at-top
  from tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top

  local, remote = demo_world
  nq = kilt.get_task("nq")
  local_data, remote_data = (
      seqio_tasks.TaskData.resolve(
          demo_tasks.LAYOUT, data_dir=paths.join(r, "data"), num_passages=4
      )
      for r in (local, remote)
  )
  assert remote_data.passages_dir == f"{remote}/passages"
  assert remote_data.vocabulary_path == f"{remote}/vocab/spm.model"
  want = list(seqio_tasks.kilt_examples(nq, "dev", local_data))
  got = list(seqio_tasks.kilt_examples(nq, "dev", remote_data))
  assert len(got) == 6
  for g, w in zip(got, want):
    assert g.keys() == w.keys() and g["inputs"] == w["inputs"] and g["targets"] == w["targets"]
    np.testing.assert_array_equal(g["passage_ids"], w["passage_ids"])
    assert list(g["passages"]) == list(w["passages"])
  table = PassageTable(remote_data.passages_dir)
  assert table.fingerprint == PassageTable(local_data.passages_dir).fingerprint
  assert table[len(table) - 1] == PassageTable(local_data.passages_dir)[len(table) - 1]
  text = want[0]["passages"][0]
  assert remote_data.vocabulary().encode(text) == local_data.vocabulary().encode(text)
  with pytest.raises(
      FileNotFoundError, match=f"KILT file {remote}/nope/nq-dev-kilt.jsonl not found"
  ):
    seqio_tasks.TaskData.resolve(demo_tasks.LAYOUT, data_dir=f"{remote}/nope").kilt_file(nq, "dev")
