"""Host reader: batches gain memory_values / memory_mask equal to the store's rows; read-ahead
yields what synchronous reads give, in order, and stays bounded; an error reaches the consumer
after the batches before it; a consumer that stops early stops the reads."""

import gc
import itertools

import numpy as np
import pytest

from lumenvq.memory.host_reader import HostMemoryReader
from lumenvq.memory.memory_store import MemoryStore, StoreError

N, LP, G, K, B = 40, 5, 3, 4, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, LP + 1, N).astype(np.int32)
  values = rng.integers(0, 256, (N, LP, G)).astype(np.uint8)
  values[np.arange(LP) >= lengths[:, None]] = 0
  path = str(tmp_path_factory.mktemp("host_reader") / "store")
  writer = MemoryStore.create(
      path,
      kind="codes",
      num_passages=N,
      passage_length=LP,
      width=G,
      dtype=np.uint8,
      fingerprint={},
      shard_passages=16,
      codebooks=rng.normal(size=(G, 256, 2)).astype(np.float32),
  )
  for shard in range(writer.num_shards):
    start, stop = writer.shard_range(shard)
    writer.write_shard(shard, values[start:stop], lengths[start:stop])
  writer.finalize()
  return MemoryStore.open(path), values, lengths


def _batches(count, seed=1):
  rng = np.random.default_rng(seed)
  for i in range(count):
    ids = rng.integers(-1, N, (B, K)).astype(np.int32)
    yield {"passage_ids": ids, "step": np.full(B, i)}


def test_add_memory_adds_the_rows_of_the_ids(store):
  store, values, lengths = store
  batch = next(_batches(1))
  batch["passage_ids"][0, :2] = [-1, 7]
  out = HostMemoryReader(store, K).add_memory(batch)
  ids = batch["passage_ids"]
  assert out["memory_values"].shape == (B, K, LP, G) and out["memory_mask"].shape == (B, K, LP)
  want = np.where((ids >= 0)[..., None, None], values[ids], 0)
  np.testing.assert_array_equal(out["memory_values"], want)
  np.testing.assert_array_equal(out["memory_mask"].sum(-1), np.where(ids >= 0, lengths[ids], 0))
  assert out["memory_mask"].dtype == bool and not out["memory_mask"][0, 0].any()
  np.testing.assert_array_equal(out["step"], batch["step"])
  with pytest.raises(ValueError, match=r"passage_ids of shape \(2, 3\): expected \[B, K=4\]"):
    HostMemoryReader(store, K).add_memory({"passage_ids": np.zeros((B, 3), np.int32)})


def test_read_ahead_equals_synchronous_reads_in_order_and_stays_bounded(store):
  store = store[0]
  reader = HostMemoryReader(store, K, read_ahead=2)
  want = [reader.add_memory(b) for b in _batches(9)]
  pulled = []

  def source():
    for batch in _batches(9):
      pulled.append(batch)
      yield batch

  stream = reader.wrap(source())
  first = next(stream)
  assert len(pulled) == 3  # One batch handed over and the reads of two more in flight.
  second = next(stream)
  assert len(pulled) == 4
  got = [first, second, *stream]
  assert [int(b["step"][0]) for b in got] == list(range(9))
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])
  synchronous = list(HostMemoryReader(store, K, read_ahead=0).wrap(_batches(9)))
  np.testing.assert_array_equal(synchronous[5]["memory_values"], want[5]["memory_values"])


def test_errors_reach_the_consumer_after_the_batches_before_them(store):
  store = store[0]
  batches = list(_batches(5))
  batches[2]["passage_ids"][1, 3] = N + 7
  stream = HostMemoryReader(store, K).wrap(batches)
  assert [int(b["step"][0]) for b in itertools.islice(stream, 2)] == [0, 1]
  with pytest.raises(StoreError, match=f"passage id {N + 7} is out of range"):
    next(stream)

  def failing_source():
    yield from _batches(2)
    raise RuntimeError("the input pipeline broke")

  stream = HostMemoryReader(store, K, read_ahead=4).wrap(failing_source())
  assert len([next(stream), next(stream)]) == 2
  with pytest.raises(RuntimeError, match="the input pipeline broke"):
    next(stream)


def test_a_consumer_that_stops_early_stops_the_reads(store):
  store = store[0]
  pulled = itertools.count()

  def endless():
    for step in itertools.count():
      next(pulled)
      yield {"passage_ids": np.full((B, K), step % N, np.int32)}

  stream = HostMemoryReader(store, K, read_ahead=3).wrap(endless())
  next(stream)
  stream.close()  # Reads in flight are dropped (each waits for its copy to end).
  gc.collect()
  assert next(pulled) == 4  # Nothing pulled the source after the first batch's read-ahead.
