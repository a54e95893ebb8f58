"""Device mesh from config, T5X-style logical-axis rules, and shardings for jax.jit.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`,
`joined_kv`, `vocab`, `batch`, `length`, ...); gin-bound rules map them onto
the `("data", "model")` mesh, as T5X's `standard_logical_axis_rules` do.
"""

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")


class PartitioningError(ValueError):
  """A mesh or a sharded dimension that does not fit: names the setting and numbers."""


@gin.configurable
def standard_logical_axis_rules(model_parallel_embed: bool = False):
  """T5X's 1D model-parallel rules: batch over data, wide dims over model."""
  return (
      ("batch", "data"),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("joined_kv", "model"),
      ("kv", None),
      ("embed", "model" if model_parallel_embed else None),
      ("length", None),
      ("relpos_buckets", None),
      ("passages", None),
      ("memory", ("data", "model")),  # A stored-memory table's passages: the whole mesh.
      ("codebook", "model"),
      ("quantizer_stage", None),
      ("subspace", None),
      ("subspace_dim", None),
      # memory+ (model/memory_plus.py): value rows over data, value columns over model (the
      # reference splits the value dim); product keys and queries replicated.
      ("memory_plus_rows", "data"),
      ("memory_plus_value_dim", "model"),
      ("memory_plus_query", None),
      ("memory_plus_heads", None),
      ("memory_plus_halves", None),
      ("memory_plus_keys", None),
      ("memory_plus_key_dim", None),
  )


@gin.configurable
def make_mesh(
    mesh_shape: Sequence[int] = (-1, 1), devices: Optional[Sequence[Any]] = None
) -> jax.sharding.Mesh:
  """A `("data", "model")` mesh; one -1 entry takes the remaining devices.

  The shape must use every device exactly: a mesh that does not match the
  device count stops with MESH_SHAPE and the numbers in the message.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise PartitioningError(
        f"MESH_SHAPE={tuple(mesh_shape)} must have {len(MESH_AXES)} entries "
        f"for axes {MESH_AXES}"
    )
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise PartitioningError(
        f"MESH_SHAPE={tuple(mesh_shape)}: entries must be " "positive, with at most one -1"
    )
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise PartitioningError(
          f"MESH_SHAPE={tuple(mesh_shape)} does not divide the {len(devices)} " f"available devices"
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise PartitioningError(
        f"MESH_SHAPE={tuple(mesh_shape)} needs {int(np.prod(shape))} devices, "
        f"but {len(devices)} are available"
    )
  return jax.make_mesh(
      tuple(shape),
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def logical_shardings(abstract_tree, mesh, rules):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned`."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, mesh, rules):
  """Every dimension mapped to a mesh axis must divide by that axis' size."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_tree))
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(leaves, spec_leaves):
    for dim, axes in zip(leaf.shape, tuple(spec)):
      for axis in (axes,) if isinstance(axes, str) else (axes or ()):
        size = mesh.shape[axis]
        if dim % size:
          name = "/".join(str(getattr(k, "key", k)) for k in path)
          raise PartitioningError(
              f"{name} has a dimension of {dim} that does not divide by mesh "
              f"axis '{axis}' of size {size} (MESH_SHAPE={tuple(mesh.shape.values())})"
          )


def data_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Batch-major arrays: the leading axis over `data`, the rest replicated."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def check_batch(batch_size: int, mesh, setting: str = "BATCH_SIZE"):
  if batch_size % mesh.shape["data"]:
    raise PartitioningError(
        f"{setting}={batch_size} does not divide by mesh axis 'data' of size "
        f"{mesh.shape['data']} (MESH_SHAPE={tuple(mesh.shape.values())})"
    )


@contextlib.contextmanager
def axis_rules_and_mesh(mesh, rules):
  """The context jitted model code traces in: logical constraints resolve
  against `rules` on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
