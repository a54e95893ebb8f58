"""Two local CPU processes (gloo collectives, 2 devices each, mesh 2x2) train the
tiny model through `python -m lumenvq.train`, each feeding its own shard of
the batch; they save, restore, and stop together when only one of them gets
SIGTERM. The result matches one process with the same global batch within 1e-5.
Two processes on a shuffled SeqIO task killed with -9 resume from their saved input
positions to the parameters of an uninterrupted two-process run.
"""

import os
import re
import signal
import socket
import subprocess
import sys

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from lumenvq import train as train_cli
from lumenvq.training import gin_cli, param_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = "gin_configs/debug/tiny_train.gin"
BINDINGS = [
    "get_source.backend = 'numpy'",
    "train.eval_every = 0",
    "MetricsLogger.log_every = 1",
    "Checkpointer.save_every = 3",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(tmp_path):
  return dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _launch(model_dir, steps, env, extra=()):
  port = _free_port()
  return [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              "lumenvq.train",
              f"--gin_file={GIN_FILE}",
              *[f"--gin.{b.replace(' = ', '=')}" for b in BINDINGS],
              f"--gin.MODEL_DIR='{model_dir}'",
              f"--gin.TRAIN_STEPS={steps}",
              "--gin.MESH_SHAPE=(2, 2)",
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
              *extra,
          ],
          cwd=REPO,
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]


def _finish(procs):
  logs = [p.communicate(timeout=300)[1] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  return logs


def _params(model_dir, step):
  """Parameters of a checkpoint saved by any topology, read onto this process' device 0."""
  path = str(model_dir / "checkpoints" / str(step) / "params")
  stored = ocp.StandardCheckpointer().metadata(path).item_metadata["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored
  )
  return param_io.flat_names(param_io.restore_params(path, abstract))


def _train_in_process(model_dir, steps):
  """The single-process reference: 8 devices, mesh (8, 1), the same global batch."""
  gin.clear_config()
  gin_cli.parse_gin([GIN_FILE], BINDINGS + [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}"])
  try:
    assert train_cli.train() == steps
  finally:
    gin.clear_config()


def test_two_processes_train_save_restore_preempt_and_match_one(tmp_path):
  env = _env(tmp_path)
  multi = tmp_path / "multi"
  logs = _finish(_launch(multi, 3, env))
  assert all("jax.distributed.initialize(localhost" in log for log in logs)
  assert sorted(os.listdir(multi / "checkpoints")) == ["3"]

  # Resume from step 3; SIGTERM reaches process 1 only, both save the same step.
  procs = _launch(multi, 100, env)
  log1 = []
  for line in procs[1].stderr:
    log1.append(line)
    if " step 5: " in line:
      procs[1].send_signal(signal.SIGTERM)
      break
  rest = _finish(procs)
  logs = [rest[0], "".join(log1) + rest[1]]
  assert all("continuing from step 3" in log for log in logs)
  stopped = {
      int(re.search(r"Preempted: saved a checkpoint at step (\d+)", log).group(1)) for log in logs
  }
  assert len(stopped) == 1
  step = stopped.pop()
  assert 5 <= step < 100

  single = tmp_path / "single"
  _train_in_process(single, step)
  got, want = _params(multi, step), _params(single, step)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_two_processes_killed_with_9_resume_to_the_uninterrupted_params(tmp_path):
  env = _env(tmp_path)
  # Each process's stream is its shard of a shuffled tf.data pipeline: the input position
  # saved per process is the tf.data iterator's (training/input_checkpoint.py).
  extra = [
      "--gin.get_source.backend='seqio'",
      "--gin.train.shuffle=True",
      "--gin.Checkpointer.save_every=2",
  ]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_launch(straight, 6, env, extra))
  procs = _launch(killed, 6, env, extra)
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
  logs = _finish(_launch(killed, 6, env, extra))
  assert all(f"continuing from step {saved[-1]}" in log for log in logs)
  got, want = _params(killed, 6), _params(straight, 6)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
