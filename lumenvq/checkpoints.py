"""Train-state checkpoints (orbax CheckpointManager) and preemption handling.

Layout: `MODEL_DIR/checkpoints/<step>/{params,opt_state}`; the `params` item
holds `{"params": tree}` exactly as `param_io.save_params` writes it, so
`param_io.restore_params(".../<step>/params")` and finetuning from a training
checkpoint work. Orbax writes each step under a temporary name and renames it
when complete, so a process killed mid-save leaves the previous step latest.
Restores land on the shardings of the given abstract state, i.e. on whatever
mesh the restoring job uses.
"""
import os
import signal
import uuid

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lumenvq import param_io


class CheckpointError(ValueError):
  """A checkpoint that cannot be written or does not fit the configured model."""


def check_writable(directory: str) -> str:
  """Creates `directory` and proves it writable, before any compute is spent."""
  directory = os.path.abspath(directory)
  probe = os.path.join(directory, f".write_probe_{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"MODEL_DIR {directory} is not writable: {e}") from e
  return directory


@gin.configurable(denylist=["directory"])
class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the newest `keep`."""

  def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(self.directory, item_handlers={
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler()}, options=ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """On multiples of `save_every` (orbax alone would also save the first step)."""
    return step % self.save_every == 0

  def save(self, step: int, state) -> None:
    """Starts saving `state` (a trainer.TrainState) at `step`; returns before it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave({"params": state.params}),
        opt_state=ocp.args.StandardSave(state.opt_state)), force=True)

  def _check_params(self, step: int, abstract_params):
    stored = self.manager.item_metadata(step)["params"]
    try:
      param_io.check_shapes(abstract_params, getattr(stored, "tree", stored)["params"],
                            os.path.join(self.directory, str(step)))
    except ValueError as e:
      raise CheckpointError(str(e)) from e

  def restore(self, abstract_state, step=None):
    """The train state at `step` (default latest) on `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    self._check_params(step, abstract_state.params)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore({"params": abstract_state.params}),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"the optimizer state in {self.directory}/{step} does not fit the configured "
          f"optimizer (was it saved with another one?): {e}") from e
    step_array = jax.make_array_from_callback(
        (), abstract_state.step.sharding, lambda _: np.asarray(step, np.int32))
    return abstract_state.replace(step=step_array, params=restored["params"]["params"],
                                  opt_state=restored["opt_state"])

  def restore_params(self, abstract_params, step=None):
    """Only the parameters (eval, infer): the optimizer state is not read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    self._check_params(step, abstract_params)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore({"params": abstract_params})))
    return restored["params"]["params"], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_param_dir(path: str, abstract_params):
  """`param_io.restore_params`, its errors (missing, wrong shapes) as CheckpointError."""
  try:
    return param_io.restore_params(path, abstract_params)
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(str(e)) from e


def load_params(abstract_params, model_dir=None, step=None, params_path=None):
  """(params, step) for eval/infer: from `params_path` (a `param_io` directory, step
  0), else from MODEL_DIR/checkpoints at `step` (default latest)."""
  if params_path:
    return restore_param_dir(params_path, abstract_params), 0
  if not model_dir:
    raise CheckpointError("give MODEL_DIR (with checkpoints/) or a CHECKPOINT_PATH")
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    return ckpt.restore_params(abstract_params, step)
  finally:
    ckpt.close()


class PreemptionWatcher:
  """Tells the training loop when to save and stop because of SIGTERM.

  One process: a SIGTERM handler sets a flag. Several processes (after
  `jax.distributed.initialize`): JAX's preemption service catches SIGTERM on
  any host and all hosts agree on the step through
  `reached_preemption_sync_point`, which every host calls at every step.
  """

  def __init__(self):
    self.received = False
    self._distributed = jax.distributed.is_initialized()
    self._previous = None
    if not self._distributed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint after the current step")
    self.received = True

  def reached(self, step: int) -> bool:
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
