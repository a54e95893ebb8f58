"""Parameter trees to and from orbax checkpoints, with shape checks that name the parameter.

Used by checkpoint import (checkpoint_import) and by anything that restores a
bare parameter tree; the trainer's CheckpointManager keeps whole train states.
"""

import flax
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from lumenvq import paths


def flat_names(tree) -> dict:
  """{'encoder/layers_0/attention/query/kernel': leaf, ...}."""
  return {
      "/".join(k): v
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(tree))).items()
  }


def unflat_names(flat: dict):
  """The nested tree of `{'a/b/c': leaf}`, the inverse of `flat_names`."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_shapes(expected, actual, source: str, what: str = "parameter"):
  """Raise naming the first `what` (parameter, model state) missing, unexpected or of
  the wrong shape."""
  exp, act = flat_names(expected), flat_names(actual)
  for name, leaf in exp.items():
    if name not in act:
      raise ValueError(f"{source}: {what} {name} is missing")
    if tuple(act[name].shape) != tuple(leaf.shape):
      raise ValueError(
          f"{source}: {what} {name} has shape "
          f"{tuple(act[name].shape)}, the config expects {tuple(leaf.shape)}"
      )
  extra = sorted(set(act) - set(exp))
  if extra:
    raise ValueError(
        f"{source}: {what} {extra[0]} is not in the network " f"({len(extra)} unexpected in all)"
    )


def save_params(directory: str, params) -> None:
  """Writes `{"params": params}`; orbax finalises the directory atomically."""
  directory = paths.resolve(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, {"params": jax.tree_util.tree_map(np.asarray, params)})
  ckptr.wait_until_finished()


def restore_params(directory: str, abstract_params=None, fresh_params=None):
  """Reads `{"params": ...}`; with `abstract_params` (ShapeDtypeStructs, maybe
  with shardings) the shapes are checked first and arrays land on those shardings.

  `fresh_params` (a tree like `abstract_params`): parameters the checkpoint lacks are taken
  from it instead of refused (T5X's fallback_to_scratch: a LUMEN checkpoint starts a reader
  with a new head). Parameters it has but the network lacks are still refused."""
  directory = paths.resolve(directory)
  if not paths.path(directory).is_dir():
    raise FileNotFoundError(f"no parameter checkpoint at {directory}")
  ckptr = ocp.StandardCheckpointer()
  if abstract_params is None:
    return ckptr.restore(directory)["params"]
  stored = ckptr.metadata(directory).item_metadata["params"]
  missing = {}
  if fresh_params is not None:
    have, fresh = flat_names(stored), flat_names(fresh_params)
    missing = {name: fresh[name] for name in flat_names(abstract_params) if name not in have}
    abstract_params = unflat_names(
        {n: v for n, v in flat_names(abstract_params).items() if n not in missing}
    )
  check_shapes(abstract_params, stored, directory)
  restored = ckptr.restore(directory, {"params": nn.meta.unbox(abstract_params)})["params"]
  if not missing:
    return restored
  return unflat_names({**flat_names(restored), **missing})
