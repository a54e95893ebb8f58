"""The device-resident memory table: a store's rows held across the whole mesh, and the
gather that answers a batch's passage ids inside a jitted step.

A store's values ([N, Lp, W] codes or vectors; [N, Lp, R, G] residual codes) and lengths
[N] are padded to a multiple of the devices they are split over and sharded along the
passage axis, logical axis "memory" (by default over every mesh axis: each device holds
N / D rows). Each process reads only the rows of its own devices (`load`).

`gather` runs under shard_map: every device looks up the ids it owns (local index = id -
its offset), writes zeros for the others, and the devices' answers are summed. Exactly one
device owns a valid id, and rows travel as unsigned integer words where their bytes allow
(`_words`), so the sum is that device's row bit for bit (a float sum would turn -0.0 into
0.0), with no one-hot mask or all-gather of candidates. The sum over the batch axis is a
reduce-scatter, so each device receives only its batch rows (half the traffic of an
all-reduce); the other table axes are all-reduced. An id owned by no device (-1, or one past
the table, which jit cannot raise on: use `check_ids` on the host) gives zeros and length 0.
"""

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

TABLE_AXIS = "memory"  # Logical name of the passage axis (partitioning's rules map it).
BATCH_MESH_AXIS = "data"  # Batches are sharded over it (partitioning.data_sharding).


@flax.struct.dataclass
class MemoryTable:
  """Rows of a memory store on device; a pytree that jitted steps take as an argument.

  values [Npad, Lp, ...] and lengths [Npad] int32, rows [num_passages, Npad) zero; both
  sharded along axis 0 over the mesh axes `axes` (empty: every device holds all rows).
  """

  values: jax.Array
  lengths: jax.Array
  num_passages: int = flax.struct.field(pytree_node=False)
  mesh: Any = flax.struct.field(pytree_node=False)
  axes: tuple = flax.struct.field(pytree_node=False)


def table_axes(mesh, rules) -> tuple:
  """The mesh axes the passage axis is split over, from the logical rule for "memory"."""
  (axes,) = nn.logical_to_mesh_axes((TABLE_AXIS,), rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(
        f"logical axis rule {TABLE_AXIS!r} -> {axes} names mesh axes {unknown} "
        f"that the mesh {dict(mesh.shape)} does not have"
    )
  return axes


def load(store, mesh, rules) -> MemoryTable:
  """The store's rows on `mesh`, sharded by the rule for "memory"; this process reads
  only the blocks its devices hold (`store.read_range`, as `memory_store.MemoryStore`),
  each once, and pads the last block with zero rows."""
  axes = table_axes(mesh, rules)
  parts = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
  n = store.num_passages
  padded = -(-n // parts) * parts
  sharding = NamedSharding(mesh, P(axes or None))
  first, _ = store.read_range(0, min(1, n))  # Row shape and dtype as read() gives them.
  blocks = {}

  def block(index, which):
    rows = index[0]
    start, stop = rows.start or 0, padded if rows.stop is None else rows.stop
    if (start, stop) not in blocks:
      values = np.zeros((stop - start,) + first.shape[1:], first.dtype)
      lengths = np.zeros((stop - start,), np.int32)
      if start < n:
        got_values, got_lengths = store.read_range(start, min(stop, n))
        values[: len(got_values)], lengths[: len(got_lengths)] = got_values, got_lengths
      blocks[start, stop] = values, lengths
    return blocks[start, stop][which][(slice(None),) + tuple(index[1:])]

  values = jax.make_array_from_callback(
      (padded,) + first.shape[1:], sharding, lambda index: block(index, 0)
  )
  lengths = jax.make_array_from_callback((padded,), sharding, lambda index: block(index, 1))
  return MemoryTable(values, lengths, n, mesh, axes)


def _words(block):
  """block [rows, ...] as unsigned integer words [rows, n]: 4-byte words where a row's bytes
  divide by 4, else words of its own item size. XLA:CPU's collectives reduce element by
  element, so uint8 codes cost 4x the time of the same bytes as words; and an integer sum
  keeps every bit of a float row (a float sum turns -0.0 into 0.0)."""
  size = block.dtype.itemsize
  row_bytes = size * math.prod(block.shape[1:])
  if block.ndim < 2 or size > 4:
    return block
  word = 4 if row_bytes % 4 == 0 else size
  per_word = () if word == size else (word // size,)  # bitcast to a wider type eats it.
  rows = block.reshape(block.shape[0], row_bytes // word, *per_word)
  return jax.lax.bitcast_convert_type(rows, _UNSIGNED[word])


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _gather_rows(table: MemoryTable, array, ids, scatter: bool):
  """Rows `array[ids]` (zeros for ids no device owns) as [*ids.shape, *row_shape]."""
  # A mesh axis of size 1 splits nothing, but a psum over it is still a collective on
  # XLA:CPU (a copy and a rendezvous of every device, as costly as the reduce-scatter).
  axes = tuple(a for a in table.axes if table.mesh.shape[a] > 1)
  summed = tuple(a for a in axes if not (scatter and a == BATCH_MESH_AXIS))

  def local(block, ids):
    words = _words(block) if axes else block  # Words only for a collective to move.
    rows = words.shape[0]
    offset = jax.lax.axis_index(axes) * rows if axes else 0
    index = ids - offset
    owned = (index >= 0) & (index < rows)
    found = jnp.take(words, jnp.clip(index, 0, rows - 1), axis=0, mode="clip")
    owned = owned.reshape(owned.shape + (1,) * (found.ndim - owned.ndim))
    found = jnp.where(owned, found, jnp.zeros((), found.dtype))
    if summed:
      found = jax.lax.psum(found, summed)
    if scatter:
      found = jax.lax.psum_scatter(found, BATCH_MESH_AXIS, scatter_dimension=0, tiled=True)
    found = jax.lax.bitcast_convert_type(found, block.dtype)
    return found.reshape(found.shape[: ids.ndim] + block.shape[1:])

  out = P(BATCH_MESH_AXIS) if scatter else P()
  return jax.shard_map(local, mesh=table.mesh, in_specs=(P(axes or None), P()), out_specs=out)(
      array, ids
  )


def _scatters(table: MemoryTable, ids) -> bool:
  """Whether the answer can come back batch-sharded: the batch axis splits the table (in 2
  or more parts: a reduce-scatter over one device is still a copy) and the leading ids
  dimension divides by it."""
  parts = table.mesh.shape.get(BATCH_MESH_AXIS, 1)
  return BATCH_MESH_AXIS in table.axes and parts > 1 and ids.ndim > 0 and ids.shape[0] % parts == 0


def gather(table: MemoryTable, ids) -> tuple:
  """(values [*ids.shape, Lp, ...], lengths [*ids.shape]) of passage ids (int, -1: none)
  inside jit; sharded over the batch axis along ids' first dimension when it divides, else
  replicated. Ids -1 (and any id outside [0, num_passages)) give zeros and length 0."""
  ids = jnp.asarray(ids, jnp.int32)
  scatter = _scatters(table, ids)
  return (
      _gather_rows(table, table.values, ids, scatter),
      _gather_rows(table, table.lengths, ids, scatter),
  )


def gather_lengths(table: MemoryTable, ids):
  """lengths [*ids.shape] alone (a small collective: e.g. to count memory tokens)."""
  ids = jnp.asarray(ids, jnp.int32)
  return _gather_rows(table, table.lengths, ids, _scatters(table, ids))


def length_mask(lengths, passage_length: int):
  """bool [..., Lp]: the first `length` positions of each passage are real.

  `memory_store.MemoryStore.mask`'s rule on device arrays (it works on numpy)."""
  return jnp.arange(passage_length) < lengths[..., None]


def check_ids(ids, num_passages: int, source: Optional[str] = None) -> None:
  """Raises on the host for ids outside [-1, num_passages): jit cannot raise, and the
  gather would quietly answer them with empty passages."""
  ids = np.asarray(ids)
  bad = ids[(ids < -1) | (ids >= num_passages)]
  if bad.size:
    where = f" of the memory store {source}" if source else ""
    raise ValueError(
        f"passage id {int(bad[0])} is out of range: the memory table{where} "
        f"holds {num_passages} passages (ids 0..{num_passages - 1}, -1 for none)"
    )
