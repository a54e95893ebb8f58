"""Input positions: a stream restored from `position(step)` gives exactly the batches of an
uninterrupted stream after `step` (shuffled SeqIO pipeline, numpy source, each of two data
shards, batches pulled ahead), the position does not grow with the step, and two training
processes killed with -9 resume from their saved positions to the uninterrupted run's
parameters.
"""

import itertools
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lumenvq.model import models
from lumenvq.training import checkpoints, input_checkpoint, input_pipeline, param_io

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENGTHS = {"inputs": 8, "targets": 8}
CONVERT = models.EncDecFeatureConverter(LENGTHS)
SHUFFLED = dict(shuffle=True, seed=7)


@pytest.fixture(scope="module")
def seqio_source():
  return input_pipeline.get_source("lumenvq_debug_copy", LENGTHS, backend="seqio")


def _layout(num_shards=1, shard_index=0, batch_size=8):
  local = batch_size // num_shards
  return input_pipeline.DataLayout(batch_size, shard_index * local, (shard_index + 1) * local)


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def _resumed(source, layout, step, pulled, count):
  """`count` batches after `step` from a stream that had pulled `pulled` >= step batches."""
  stream = input_pipeline.train_batches(source, CONVERT, layout, 0, **SHUFFLED)
  list(itertools.islice(stream, pulled))
  position = stream.position(step)
  resumed = input_pipeline.train_batches(
      source, CONVERT, layout, step, position=position, **SHUFFLED
  )
  return list(itertools.islice(resumed, count)), position


@pytest.mark.parametrize("shard_index", [0, 1])
def test_shuffled_seqio_stream_resumes_exactly_on_each_shard(seqio_source, shard_index):
  layout = _layout(2, shard_index)
  want = list(
      itertools.islice(
          input_pipeline.train_batches(seqio_source, CONVERT, layout, 0, **SHUFFLED), 9
      )
  )
  got, _ = _resumed(seqio_source, layout, 3, 5, 6)  # Batches 4, 5 pulled ahead (read-ahead).
  _assert_same(got, want[3:9])
  skipped = input_pipeline.train_batches(seqio_source, CONVERT, layout, 3, **SHUFFLED)
  _assert_same(list(itertools.islice(skipped, 6)), want[3:9])  # Without a position: skips.


def test_position_does_not_grow_with_the_step(seqio_source):
  layout = _layout()
  _, early = _resumed(seqio_source, layout, 2, 2, 1)
  _, late = _resumed(seqio_source, layout, 60, 60, 1)
  assert abs(len(late) - len(early)) < 0.05 * len(early)


def test_numpy_source_resumes_exactly():
  source = input_pipeline.get_source("lumenvq_debug_reverse", LENGTHS, backend="numpy")
  layout = _layout(2, 1)
  want = list(itertools.islice(input_pipeline.train_batches(source, CONVERT, layout, 0), 7))
  got, _ = _resumed(source, layout, 2, 4, 5)
  _assert_same(got, want[2:7])


def test_position_of_another_step_or_source_is_refused(seqio_source):
  layout = _layout()
  stream = input_pipeline.train_batches(seqio_source, CONVERT, layout, 0)
  next(stream)
  position = stream.position(1)
  with pytest.raises(ValueError, match="tfdata position at step 1, but .* at step 2"):
    input_pipeline.train_batches(seqio_source, CONVERT, layout, 2, position=position)
  numpy_source = input_pipeline.get_source("lumenvq_debug_copy", LENGTHS, backend="numpy")
  with pytest.raises(ValueError, match="but this run resumes a indexed source"):
    input_pipeline.train_batches(numpy_source, CONVERT, layout, 1, position=position)


def test_checkpointer_keeps_the_position_per_process(tmp_path, seqio_source):
  stream = input_pipeline.train_batches(seqio_source, CONVERT, _layout(), 0)
  next(stream)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, async_save=False)
  ckpt.manager.save(
      1,
      args=ocp.args.Composite(
          input=input_checkpoint.InputPositionSave(stream.position(1)),
          params=ocp.args.StandardSave({"params": {"w": np.ones(2)}}),
      ),
  )
  ckpt.wait()
  assert (tmp_path / "1" / "input" / "process_00000-of-00001").exists()
  assert ckpt.restore_input_position(1) == stream.position(1)
  ckpt.close()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(model_dir, steps, env):
  port = _free_port()
  flags = [
      "--gin_file=gin_configs/debug/tiny_train.gin",
      "--gin.get_source.backend='seqio'",
      "--gin.train.shuffle=True",
      "--gin.train.eval_every=0",
      "--gin.MetricsLogger.log_every=1",
      "--gin.Checkpointer.save_every=2",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.MESH_SHAPE=(2, 2)",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
  ]
  return [
      subprocess.Popen(
          [sys.executable, "-m", "lumenvq.train", *flags, f"--process_id={i}"],
          cwd=REPO,
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]


def _finish(procs):
  logs = [p.communicate(timeout=400)[1] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  return logs


def _params(model_dir, step):
  """Parameters saved by two processes, read onto this process' device 0."""
  path = str(model_dir / "checkpoints" / str(step) / "params")
  stored = ocp.StandardCheckpointer().metadata(path).item_metadata["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored
  )
  return param_io.flat_names(param_io.restore_params(path, abstract))


def test_two_processes_killed_with_9_resume_to_the_uninterrupted_params(tmp_path):
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_launch(straight, 6, env))
  procs = _launch(killed, 6, env)
  for line in procs[0].stderr:
    if " step 4: " in line:  # Checkpoint 4 was started at step 4: kill at once, mid-save or after.
      break
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
  saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert saved and saved[-1] in (2, 4)
  for i in range(2):
    assert (
        killed / "checkpoints" / str(saved[-1]) / "input" / f"process_{i:05d}-of-00002"
    ).exists()
  logs = _finish(_launch(killed, 6, env))
  assert all(f"continuing from step {saved[-1]}" in log for log in logs)
  got, want = _params(killed, 6), _params(straight, 6)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
