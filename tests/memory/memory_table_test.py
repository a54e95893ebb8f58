"""The device-resident memory table: loaded from a real store block by block, sharded over
the whole mesh, and gathered inside jit equal to numpy indexing (repeats, -1, every shard
border, N not divisible by the devices; float rows bit for bit) on 1, 8x1 and 4x2 meshes,
with rows crossing devices as words in only the collectives the mesh needs; ids checked on
the host."""

import re

import jax
import numpy as np
import pytest

from lumenvq.memory import memory_store, memory_table
from lumenvq.training import partitioning

RULES = partitioning.standard_logical_axis_rules()
N, LP, G = 13, 4, 3  # 13 rows over 8 devices: padded to 16, blocks of 2.


def _store(path, values, lengths, kind="codes", codebooks=None):
  store = memory_store.MemoryStore.create(
      str(path),
      kind=kind,
      num_passages=len(values),
      passage_length=values.shape[1],
      width=values.shape[-1],
      dtype=values.dtype,
      fingerprint={"test": str(path)},
      codebooks=codebooks,
      shard_passages=5,
  )
  for shard in range(store.num_shards):
    start, stop = store.shard_range(shard)
    store.write_shard(shard, values[start:stop], lengths[start:stop])
  store.finalize()
  return memory_store.MemoryStore.open(str(path))


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
  """A uint16 code store and its rows in numpy."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, LP + 1, N).astype(np.int32)
  values = rng.integers(1, 2**16, (N, LP, G)).astype(np.uint16)
  values[np.arange(LP) >= lengths[:, None]] = 0  # Padding positions hold no code.
  codebooks = rng.normal(size=(G, 2**16, 2)).astype(np.float32)
  return (
      _store(tmp_path_factory.mktemp("codes") / "store", values, lengths, codebooks=codebooks),
      values,
      lengths,
  )


def _mesh(shape):
  return partitioning.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])


def _expected(values, lengths, ids):
  present = ids >= 0
  rows = values[np.maximum(ids, 0)]
  return (
      np.where(present.reshape(present.shape + (1,) * (rows.ndim - ids.ndim)), rows, 0),
      np.where(present, lengths[np.maximum(ids, 0)], 0),
  )


def _gather(table, ids):
  with jax.set_mesh(table.mesh):
    return jax.device_get(jax.jit(memory_table.gather)(table, ids))


def _border_ids(table, rng, batch):
  """Every block's first and last row (those past N as -1), repeats, -1 and random ids."""
  block = table.values.sharding.shard_shape(table.values.shape)[0]
  borders = [
      i for start in range(0, table.values.shape[0], block) for i in (start, start + block - 1)
  ]
  ids = [i if i < N else -1 for i in borders] + [5, 5, -1, 0, N - 1]
  width = -(-len(ids) // batch) + 2
  ids += list(rng.integers(-1, N, batch * width - len(ids)))
  return np.array(ids, np.int32).reshape(batch, width)


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (1, 1)])
def test_gather_equals_numpy_indexing(codes, shape):
  store, values, lengths = codes
  mesh = _mesh(shape)
  table = memory_table.load(store, mesh, RULES)
  devices = int(np.prod(shape))
  assert table.num_passages == N and table.axes == ("data", "model")
  assert table.values.shape == (-(-N // devices) * devices, LP, G)
  assert table.values.dtype == np.uint16 and table.lengths.dtype == np.int32
  # Each device holds its own block of rows: the whole mesh splits the passage axis.
  shard_rows = {s.data.shape[0] for s in table.values.addressable_shards}
  assert shard_rows == {table.values.shape[0] // devices}
  ids = _border_ids(table, np.random.default_rng(1), 8)
  got_values, got_lengths = _gather(table, ids)
  want_values, want_lengths = _expected(values, lengths, ids)
  np.testing.assert_array_equal(got_values, want_values)
  np.testing.assert_array_equal(got_lengths, want_lengths)
  # A batch the data axis does not divide comes back replicated, still exact.
  odd = ids[:3]
  got_values, got_lengths = _gather(table, odd)
  np.testing.assert_array_equal(got_values, _expected(values, lengths, odd)[0])
  np.testing.assert_array_equal(got_lengths, _expected(values, lengths, odd)[1])


def test_gather_output_is_batch_sharded_and_lengths_make_the_mask(codes):
  store, values, lengths = codes
  table = memory_table.load(store, _mesh((4, 2)), RULES)
  ids = np.array([[0, 12, -1], [3, 3, 7], [1, 2, 4], [11, 10, 9]], np.int32)
  with jax.set_mesh(table.mesh):
    got, got_lengths = jax.jit(memory_table.gather)(table, ids)
    only_lengths = jax.jit(memory_table.gather_lengths)(table, ids)
  assert got.sharding.spec == jax.sharding.PartitionSpec("data")
  assert got.sharding.shard_shape(got.shape) == (1, 3, LP, G)
  np.testing.assert_array_equal(only_lengths, got_lengths)
  mask = np.asarray(memory_table.length_mask(got_lengths, LP))
  np.testing.assert_array_equal(mask, memory_store.MemoryStore.mask(np.asarray(got_lengths), LP))
  np.testing.assert_array_equal(np.asarray(got)[~mask], 0)


def test_each_block_is_read_once_when_the_table_is_replicated_over_model(codes):
  """With "memory" mapped to `data` alone, the two `model` devices of a block share it:
  the store is read once per block, and the gather all-reduces nothing over `model`."""
  store, values, lengths = codes
  reads = []

  class Counting:  # Records the row ranges load asks the real store for.
    num_passages = store.num_passages

    def read_range(self, start, stop):
      reads.append((start, stop))
      return store.read_range(start, stop)

  rules = tuple(r for r in RULES if r[0] != "memory") + (("memory", "data"),)
  table = memory_table.load(Counting(), _mesh((4, 2)), rules)
  assert table.axes == ("data",) and table.values.shape[0] == 16
  assert sorted(reads[1:]) == [(0, 4), (4, 8), (8, 12), (12, 13)]  # After a 1-row probe.
  ids = _border_ids(table, np.random.default_rng(2), 4)
  got_values, got_lengths = _gather(table, ids)
  want_values, want_lengths = _expected(values, lengths, ids)
  np.testing.assert_array_equal(got_values, want_values)
  np.testing.assert_array_equal(got_lengths, want_lengths)


@pytest.mark.parametrize("width", [8, 3])  # 16 bytes: as uint32 words; 6 bytes: as bf16.
def test_bfloat16_vectors_gather_bit_for_bit(tmp_path, width):
  rng = np.random.default_rng(3)
  lengths = np.array([3, 1, 0, 2, 3], np.int32)
  vectors = rng.normal(size=(5, 3, width)).astype(jax.numpy.bfloat16)
  vectors[np.arange(3) >= lengths[:, None]] = 0
  vectors[0, 0, 0] = -0.0  # A float sum across devices would make it +0.0.
  store = _store(tmp_path / "vectors", vectors, lengths, kind="vectors")
  table = memory_table.load(store, _mesh((2, 4)), RULES)
  ids = np.array([[4, -1], [0, 0], [2, 3], [1, 4]], np.int32)
  got_values, got_lengths = _gather(table, ids)
  assert got_values.dtype == vectors.dtype
  want_values, want_lengths = _expected(vectors, lengths, ids)
  assert np.asarray(got_values).tobytes() == want_values.tobytes()
  np.testing.assert_array_equal(got_lengths, want_lengths)


@pytest.mark.parametrize(
    "shape,collectives",
    [
        ((8, 1), ["reduce-scatter s32", "reduce-scatter u32"]),  # None over the size-1 axis.
        ((4, 2), ["all-reduce s32", "all-reduce u32", "reduce-scatter s32", "reduce-scatter u32"]),
        ((1, 1), []),
    ],
)  # One device: no collective, not even a trivial one.
def test_rows_cross_devices_as_words_in_the_collectives_the_mesh_needs(codes, shape, collectives):
  table = memory_table.load(codes[0], _mesh(shape), RULES)
  ids = np.zeros((8, 2), np.int32)
  with jax.set_mesh(table.mesh):
    hlo = jax.jit(memory_table.gather).lower(table, ids).compile().as_text()
  found = re.findall(r"= (\w+)\[[^=]*? (all-reduce|reduce-scatter|all-gather|all-to-all)\(", hlo)
  assert sorted(f"{op} {dtype}" for dtype, op in found) == collectives
