"""`python -m lumenvq.train` end to end: a straight run, resumption after SIGTERM
(also one before the first step) and after kill -9 (same parameters within 1e-6, same logged losses), a NaN
that stops training and keeps the last good checkpoint, an unwritable
MODEL_DIR, and gin typos.

The runs use the debug task's numpy backend (no seqio import) and share a
persistent XLA compilation cache, so only the first run compiles.
"""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from lumenvq import train as train_cli
from lumenvq.data import copy_task
from lumenvq.training import gin_cli, param_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
SAVE_EVERY = 5


def _env(cache_dir):
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


def _command(model_dir, steps=STEPS, *extra, gin_files=("gin_configs/debug/tiny_train.gin",)):
  return [
      sys.executable,
      "-m",
      "lumenvq.train",
      *[f"--gin_file={f}" for f in gin_files],
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.get_source.backend='numpy'",
      "--gin.train.eval_every=0",
      "--gin.T5Config.dropout_rate=0.1",  # Resumed dropout masks must match too.
      "--gin.MetricsLogger.log_every=1",
      f"--gin.Checkpointer.save_every={SAVE_EVERY}",
      *extra,
  ]


def _run(env, *args, **kwargs):
  return _call(env, _command(*args, **kwargs))


def _call(env, command):
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _events(log_dir, tag="loss"):
  """{step: [values]} of a scalar in TensorBoard event files.

  Read by hand: the TFRecord framing is 12 header bytes, the Event proto and a
  4-byte CRC; tensorboard itself (the usual reader) is not installed. A
  record cut short by kill -9 ends the file.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  values = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      if pos + 12 + length + 4 > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.tag == tag:
          values.setdefault(event.step, []).append(value.simple_value)
  return values


def _final_params(model_dir, step=STEPS):
  return param_io.flat_names(
      param_io.restore_params(os.path.join(model_dir, "checkpoints", str(step), "params"))
  )


def _steps(model_dir):
  return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return _env(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("straight") / "model")
  result = _run(env, model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir, _events(os.path.join(model_dir, "train")), _final_params(model_dir), result


def _assert_same_run(model_dir, straight):
  _, ref_losses, ref_params, _ = straight
  params = _final_params(model_dir)
  assert params.keys() == ref_params.keys()
  for name, value in params.items():
    np.testing.assert_allclose(value, ref_params[name], atol=1e-6, err_msg=name)
  losses = _events(os.path.join(model_dir, "train"))
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step, values in losses.items():  # Steps logged twice (before a kill) agree too.
    np.testing.assert_allclose(
        values, ref_losses[step] * len(values), rtol=1e-6, err_msg=f"step {step}"
    )


def test_straight_run_writes_events_config_and_checkpoints(straight):
  model_dir, losses, _, result = straight
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS][0] < losses[1][0]
  for tag in (
      "accuracy",
      "learning_rate",
      "grad_norm",
      "steps_per_second",
      "tokens_per_second",
      "z_loss",
  ):
    assert sorted(_events(os.path.join(model_dir, "train"), tag)) == list(range(1, STEPS + 1))
  assert _steps(model_dir) == [10, 15, 20]  # Every 5 steps, the newest 3 kept.
  config = open(os.path.join(model_dir, "config.gin")).read()
  assert "TRAIN_STEPS = 20" in config and "train.model_dir = %MODEL_DIR" in config
  assert "T5Config.dropout_rate = 0.1" in config
  assert "starting from step 0" in result.stderr


def _resume_and_compare(env, model_dir, straight, expected_log):
  """Reruns the interrupted run to STEPS: it must say where it continues and
  end where the straight run ended."""
  resumed = _run(env, model_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert expected_log in resumed.stderr
  _assert_same_run(model_dir, straight)


def _sigterm_when(env, model_dir, marker):
  """Trains in `model_dir`, sends SIGTERM once a log line has `marker`; the whole log (exit 0)."""
  proc = subprocess.Popen(
      _command(model_dir),
      cwd=REPO,
      env=env,
      stderr=subprocess.PIPE,
      stdout=subprocess.DEVNULL,
      text=True,
  )
  log = []
  for line in proc.stderr:
    log.append(line)
    if marker in line:
      proc.send_signal(signal.SIGTERM)
      break
  log.extend(proc.stderr)
  assert proc.wait(timeout=120) == 0, "".join(log)[-3000:]
  return "".join(log)


def test_sigterm_saves_current_step_exits_0_and_resumes(env, straight, tmp_path):
  model_dir = str(tmp_path / "model")
  log = _sigterm_when(env, model_dir, " step 3: ")
  saved = _steps(model_dir)[-1]
  print(f"SIGTERM after step 3 was logged: saved step {saved}")
  assert 3 <= saved < STEPS, f"the run was not interrupted early enough (saved {saved})"
  assert f"Preempted: saved a checkpoint at step {saved}" in log
  _resume_and_compare(
      env, model_dir, straight, f"continuing from step {saved} to TRAIN_STEPS={STEPS}"
  )


def test_sigterm_before_the_first_step_saves_step_1_and_resumes(env, straight, tmp_path):
  model_dir = str(tmp_path / "model")
  # Restored nothing yet, the first step not compiled.
  log = _sigterm_when(env, model_dir, "starting from step 0")
  assert _steps(model_dir) == [1]
  assert "Preempted: saved a checkpoint at step 1" in log
  assert os.path.isdir(os.path.join(model_dir, "checkpoints", "1", "input"))
  _resume_and_compare(env, model_dir, straight, "continuing from step 1")


def test_kill_9_after_a_saved_step_resumes_from_it(env, straight, tmp_path):
  model_dir = str(tmp_path / "model")
  proc = subprocess.Popen(
      _command(model_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  first = os.path.join(model_dir, "checkpoints", str(SAVE_EVERY))
  deadline = time.time() + 240
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
  saved = _steps(model_dir)[-1]
  print(f"kill -9 after checkpoint {SAVE_EVERY} appeared: latest step {saved}")
  assert SAVE_EVERY <= saved < STEPS
  _resume_and_compare(env, model_dir, straight, f"continuing from step {saved}")


def test_nan_stops_with_the_step_and_keeps_last_good_checkpoint(env, straight, tmp_path):
  model_dir = str(tmp_path / "model")
  shutil.copytree(straight[0], model_dir)
  # An absurd learning rate makes the parameters overflow in the first step.
  result = _run(env, model_dir, 30, "--gin.constant_schedule.value=1e30")
  assert result.returncode == 1
  assert f"NaN/inf at step {STEPS + 1}" in result.stderr
  assert _steps(model_dir) == [10, 15, 20]
  assert sorted(_events(os.path.join(model_dir, "train"))) == list(range(1, STEPS + 1))


def test_finetune_starts_from_initial_checkpoint_params(env, straight, tmp_path):
  initial = os.path.join(straight[0], "checkpoints", str(STEPS), "params")
  result = _run(
      env,
      str(tmp_path / "model"),
      2,
      f"--gin.INITIAL_CHECKPOINT_PATH='{initial}'",
      "--gin.constant_schedule.value=0.01",
      gin_files=("gin_configs/runs/finetune.gin", "gin_configs/debug/tiny_task.gin"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Initialising parameters from {initial}" in result.stderr
  losses = _events(str(tmp_path / "model" / "train"))
  # Step 1 sees step 1's batch again, with the trained parameters.
  assert losses[1][0] < straight[1][1][0] - 1.0
  assert _steps(str(tmp_path / "model")) == [2]


def test_checkpoint_of_another_shape_names_the_parameter(env, straight):
  result = _run(env, straight[0], 30, "--gin.T5Config.mlp_dim=96")
  assert result.returncode == 1
  assert (
      "parameter decoder/layers_0/mlp/wi_0/kernel has shape (64, 128), the config "
      "expects (64, 96)"
  ) in result.stderr
  assert _steps(straight[0]) == [10, 15, 20]


def test_eval_and_infer_clis_on_another_mesh(env, straight):
  model_dir = straight[0]
  common = [
      "--gin_file=gin_configs/debug/tiny_task.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.get_source.backend='numpy'",
      "--gin.MESH_SHAPE=(1, 2)",
  ]
  result = _call(
      env,
      [
          sys.executable,
          "-m",
          "lumenvq.eval",
          "--gin_file=gin_configs/runs/eval.gin",
          *common,
          "--gin.evaluate.max_examples=20",
      ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(os.path.join(model_dir, "eval", f"metrics_{STEPS}.json")))
  assert report["step"] == STEPS and report["metrics"]["examples"] == 20
  assert set(report["metrics"]) == {
      "sequence_accuracy",
      "loss",
      "token_accuracy",
      "examples",
      "seconds_per_example",
  }
  assert report["metrics"]["seconds_per_example"] > 0
  predictions = os.path.join(model_dir, "eval", f"lumenvq_debug_copy-validation-{STEPS}.jsonl")
  assert len(open(predictions).readlines()) == 20
  assert _events(os.path.join(model_dir, "eval"), "loss")[STEPS] == [
      pytest.approx(report["metrics"]["loss"], rel=1e-6)
  ]
  result = _call(
      env,
      [
          sys.executable,
          "-m",
          "lumenvq.infer",
          "--gin_file=gin_configs/runs/infer.gin",
          *common,
          "--gin.infer.max_examples=20",
      ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "20/20" in result.stderr  # The progress bar.
  path = os.path.join(model_dir, "infer", f"lumenvq_debug_copy-validation-{STEPS}.jsonl")
  records = [json.loads(line) for line in open(path)]
  assert len(records) == 20 and set(records[0]) == {"inputs", "prediction", "targets"}
  assert (
      records[3]["inputs"]
      == copy_task.text_example("lumenvq_debug_copy", "validation", 3)["inputs"]
      == records[3]["targets"]
  )


def test_unwritable_model_dir_fails_first_with_the_path(env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = _run(env, f"{blocker}/model")
  assert result.returncode == 1
  assert f"MODEL_DIR {blocker}/model is not writable" in result.stderr
  assert "from step 0" not in result.stderr  # Stopped before building anything.


def test_gin_typo_stops_with_the_closest_names(env, tmp_path):
  result = _run(env, str(tmp_path / "model"), STEPS, "--gin.T5Config.emb_dimm=8")
  assert result.returncode == 1
  assert "doesn't have a parameter named 'emb_dimm'" in result.stderr
  assert "Closest names to 'emb_dimm': emb_dim" in result.stderr
  assert not os.path.exists(tmp_path / "model")
  for binding, hint in [
      ("Trainr.seed = 1", "Closest names to 'Trainr': Trainer"),
      ("train.model_dir = %MODEL_DR", "Closest names to 'MODEL_DR': MODEL_DIR"),
  ]:
    gin.clear_config()
    with pytest.raises(gin_cli.GinConfigError, match=hint):
      gin_cli.parse_gin(["gin_configs/debug/tiny_train.gin"], [binding])
      gin_cli.call_with_gin_errors(train_cli.train)
  gin.clear_config()


def test_gin_flags_are_rewritten_like_t5x():
  assert gin_cli.rewrite_gin_args(["prog", "--gin.MODEL_DIR='/tmp/a=b'", "--gin_file=x.gin"]) == [
      "prog",
      "--gin_bindings=MODEL_DIR = '/tmp/a=b'",
      "--gin_file=x.gin",
  ]
