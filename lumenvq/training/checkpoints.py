"""Train-state checkpoints (orbax CheckpointManager) and preemption handling.

Layout: `MODEL_DIR/checkpoints/<step>/{params,opt_state,model_state}`; the
`params` item holds `{"params": tree}` exactly as `param_io.save_params` writes
it, so `param_io.restore_params(".../<step>/params")` and finetuning from a
training checkpoint work. `model_state` (LUMEN-VQ's codebooks: the model's
variable collections besides params) is written only by models that have one.
Orbax writes each step under a temporary name and renames it when complete (on
gs://, which has no rename, it writes a commit marker last and skips steps without
one), so a process killed mid-save leaves the previous step latest. Every directory
here may be local or gs:// (`lumenvq.paths`).
Restores land on the shardings of the given abstract state, i.e. on whatever
mesh the restoring job uses.
"""

import signal
import uuid
from typing import Optional

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lumenvq import paths
from lumenvq.training import input_checkpoint, param_io

ITEMS = ("params", "opt_state", "model_state")
INPUT_ITEM = "input"  # Every process's input position (input_checkpoint.py).


class CheckpointError(ValueError):
  """A checkpoint that cannot be written or does not fit the configured model."""


def check_writable(directory: str) -> str:
  """Creates `directory` and proves it writable, before any compute is spent."""
  directory = paths.resolve(directory)
  try:
    probe = paths.makedirs(directory) / f".write_probe_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"MODEL_DIR {directory} is not writable: {e}") from e
  return directory


@gin.configurable(denylist=["directory"])
class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the newest `keep`."""

  def __init__(
      self, directory: str, save_every: int = 1000, keep: int = 3, async_save: bool = True
  ):
    self.directory = paths.resolve(directory)
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            **{item: ocp.StandardCheckpointHandler() for item in ITEMS},
            INPUT_ITEM: input_checkpoint.InputPositionHandler(),
        },
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        ),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """On multiples of `save_every` (orbax alone would also save the first step)."""
    return step % self.save_every == 0

  def save(self, step: int, state, input_position: Optional[bytes] = None) -> None:
    """Starts saving `state` (a trainer.TrainState) at `step`, with this process's
    `input_position` (every process gives its own); returns before it is on disk."""
    items = dict(
        params=ocp.args.StandardSave({"params": state.params}),
        opt_state=ocp.args.StandardSave(state.opt_state),
    )
    if state.model_state:
      items["model_state"] = ocp.args.StandardSave(state.model_state)
    if input_position is not None:
      items[INPUT_ITEM] = input_checkpoint.InputPositionSave(input_position)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _check_shapes(self, step: int, abstract_state):
    stored = self.manager.item_metadata(step)
    source = paths.join(self.directory, str(step))
    tree = lambda item: getattr(stored[item], "tree", stored[item])
    try:
      param_io.check_shapes(abstract_state.params, tree("params")["params"], source)
      if abstract_state.model_state:
        if stored.get("model_state") is None:
          raise CheckpointError(
              f"{source} has no model_state item: the configured model keeps the "
              f"collections {sorted(abstract_state.model_state)} (was it saved by another "
              "architecture?)"
          )
        param_io.check_shapes(
            abstract_state.model_state, tree("model_state"), source, what="model state"
        )
    except ValueError as e:
      raise CheckpointError(str(e)) from e

  def restore(self, abstract_state, step=None):
    """The train state at `step` (default latest) on `abstract_state`'s shardings.

    With `abstract_state.opt_state` None (eval, infer) the optimizer state is not read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    self._check_shapes(step, abstract_state)
    items = {"params": ocp.args.StandardRestore({"params": abstract_state.params})}
    if abstract_state.opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_state.opt_state)
    if abstract_state.model_state:
      items["model_state"] = ocp.args.StandardRestore(abstract_state.model_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"the optimizer state in {self.directory}/{step} does not fit the configured "
          f"optimizer (was it saved with another one?): {e}"
      ) from e
    step_array = jax.make_array_from_callback(
        (), abstract_state.step.sharding, lambda _: np.asarray(step, np.int32)
    )
    return abstract_state.replace(
        step=step_array,
        params=restored["params"]["params"],
        opt_state=restored["opt_state"] if "opt_state" in items else None,
        model_state=restored["model_state"] if "model_state" in items else {},
    )

  def restore_input_position(self, step: int) -> Optional[bytes]:
    """This process's input position saved at `step`; None for a checkpoint without one."""
    if INPUT_ITEM not in self.manager.item_metadata(step):
      return None
    args = ocp.args.Composite(**{INPUT_ITEM: input_checkpoint.InputPositionRestore()})
    return self.manager.restore(step, args=args)[INPUT_ITEM]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_param_dir(path: str, abstract_params, fresh_params=None):
  """`param_io.restore_params`, its errors (missing, wrong shapes) as CheckpointError."""
  try:
    return param_io.restore_params(path, abstract_params, fresh_params)
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(str(e)) from e


def restore_model_state_dir(params_path: str, abstract_model_state):
  """The model state saved next to a training checkpoint's `params` item
  (`<step>/model_state`); a bare parameter directory has none."""
  path = paths.join(paths.path(params_path).parent, "model_state")
  if not paths.path(path).is_dir():
    raise CheckpointError(
        f"CHECKPOINT_PATH={params_path} holds parameters only, but the model also keeps "
        f"{sorted(abstract_model_state)} (trained codebooks): give MODEL_DIR, or the params "
        f"directory of a training checkpoint (its model_state is read from {path})"
    )
  ckptr = ocp.StandardCheckpointer()
  try:
    stored = ckptr.metadata(path).item_metadata
    param_io.check_shapes(
        abstract_model_state, getattr(stored, "tree", stored), path, what="model state"
    )
  except ValueError as e:
    raise CheckpointError(str(e)) from e
  return ckptr.restore(path, abstract_model_state)


def load_state(abstract_state, model_dir=None, step=None, params_path=None):
  """(state without optimizer state, step) for eval/infer: from `params_path` (a
  `param_io` directory, step 0), else from MODEL_DIR/checkpoints at `step` (default
  latest)."""
  abstract_state = abstract_state.replace(opt_state=None)
  if params_path:
    params = restore_param_dir(params_path, abstract_state.params)
    model_state = (
        restore_model_state_dir(params_path, abstract_state.model_state)
        if abstract_state.model_state
        else {}
    )
    return abstract_state.replace(step=0, params=params, model_state=model_state), 0
  if not model_dir:
    raise CheckpointError("give MODEL_DIR (with checkpoints/) or a CHECKPOINT_PATH")
  ckpt = Checkpointer(paths.join(model_dir, "checkpoints"))
  try:
    state = ckpt.restore(abstract_state, step)
    return state, int(state.step)
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
