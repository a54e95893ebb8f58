"""Training metrics: averaged over each logging window, logged, and written as
TensorBoard event files (tensorboardX, which writes gs:// directories through
google-cloud-storage; process 0 only).

Per-step metrics stay on device until a window closes, so logging every N
steps costs one device-to-host transfer per N steps, not one per step.
"""

import contextlib
import sys
import time
from typing import Optional

import gin
import jax
import numpy as np
from absl import logging

from lumenvq import paths


def _import_tensorboardx():
  # tensorboardX imports torch (~2 s) only to recognise torch tensors; we log
  # floats. Hide torch during the import only, so a later `import torch` works.
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top

    return tensorboardX
  sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class ScalarWriter:
  """TensorBoard scalars under `log_dir`, written by process 0, flushed on each write."""

  def __init__(self, log_dir: str):
    self.log_dir = paths.resolve(log_dir)
    self._writer = None
    if jax.process_index() == 0:
      self._writer = _import_tensorboardx().SummaryWriter(self.log_dir, flush_secs=30)

  def write(self, step: int, scalars: dict):
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None  # Its gs:// file's finalizer uploads once more: now, not at exit.


# The trainer's own metrics; any other one a model adds (LUMEN-VQ's `quantizer/*`) is a
# sum over target tokens like the loss and is written as window total / total weight.
TRAINER_METRICS = frozenset(
    {
        "loss",
        "z_loss",
        "weight",
        "correct",
        "tokens",
        "learning_rate",
        "grad_norm",
        "param_norm",
        "finite",
    }
)


@gin.configurable(denylist=["log_dir"])
class MetricsLogger:
  """Collects the trainer's per-step metric sums and, every `log_every` steps,
  writes loss, z_loss, token accuracy, learning rate, gradient and parameter
  norms, steps/s and tokens/s (non-padding input + target tokens), and the
  model's own metrics (per target token, see TRAINER_METRICS)."""

  def __init__(self, log_dir: str, log_every: int = 100):
    self.log_every = log_every
    self.writer = ScalarWriter(log_dir)
    self._window = []
    self._start_time: Optional[float] = None

  def start(self):
    """Marks the beginning of the first window (after restore and setup)."""
    self._start_time = time.time()

  @contextlib.contextmanager
  def untimed(self):
    """Time spent inside (periodic eval) does not count against steps/s."""
    begin = time.time()
    try:
      yield
    finally:
      if self._start_time is not None:
        self._start_time += time.time() - begin

  def due(self, step: int) -> bool:
    return step % self.log_every == 0

  def record(self, metrics: dict):
    self._window.append(metrics)

  def write(self, step: int) -> dict:
    """Summarises the window ending at `step` and starts a new one."""
    if not self._window:
      return {}
    window = jax.device_get(self._window)
    elapsed = time.time() - (self._start_time or time.time())
    total = lambda k: float(np.sum([m[k] for m in window]))
    weight = max(total("weight"), 1e-9)
    last = window[-1]
    scalars = {
        "loss": total("loss") / weight,
        "z_loss": total("z_loss") / weight,
        "accuracy": total("correct") / weight,
        "learning_rate": float(last["learning_rate"]),
        "grad_norm": float(last["grad_norm"]),
        "param_norm": float(last["param_norm"]),
        "steps_per_second": len(window) / max(elapsed, 1e-9),
        "tokens_per_second": total("tokens") / max(elapsed, 1e-9),
    }
    scalars.update({k: total(k) / weight for k in sorted(set(last) - TRAINER_METRICS)})
    self.writer.write(step, scalars)
    logging.info("step %d: %s", step, " ".join(f"{k}={v:.7g}" for k, v in scalars.items()))
    self._window = []
    self._start_time = time.time()
    return scalars

  def close(self):
    self.writer.close()
