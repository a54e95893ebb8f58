"""shard_rows: rows read from the shard files (by the C gather and by numpy) equal
tensorstore's reads of the same store; the layouts it does not know are left to tensorstore;
a corrupt chunk or index, a chunk missing from the index, a truncated or deleted file each
name the file and the row."""

import json
import os

import google_crc32c
import numpy as np
import pytest

from lumenvq.memory import shard_rows
from lumenvq.memory.memory_store import MemoryStore
from lumenvq.memory.shard_rows import ShardReadError, ShardRowReader

N, LP, SHARD = 45, 3, 8  # 6 shards, the last one partial.


@pytest.fixture(autouse=True, params=["C gather", "numpy"])
def gather(request, monkeypatch, cxx_compiler):
  """Every test on both copy paths: the built C gather and numpy's (no compiler)."""
  if request.param == "numpy":
    monkeypatch.setattr(shard_rows, "_NATIVE", None)
  elif shard_rows._NATIVE is None:
    assert (
        cxx_compiler is None
    ), "a C++ compiler is here but lumenvq.memory._gather_rows was not built"
    pytest.skip("no C++ compiler: lumenvq.memory._gather_rows is not built")


def _store(path, dtype="uint16", width=4, kind="codes", seed=0):
  rng = np.random.default_rng(seed)
  if kind == "codes":
    codebook_size = 256 if dtype == "uint8" else 1024
    codebooks = rng.standard_normal((width, codebook_size, 2)).astype(np.float32)
    values = rng.integers(0, codebook_size, (N, LP, width)).astype(dtype)
  else:
    codebooks, values = None, rng.standard_normal((N, LP, width)).astype(dtype)
  values[5] = 0  # A row equal to the fill value is still a chunk of its own.
  store = MemoryStore.create(
      str(path),
      kind=kind,
      num_passages=N,
      passage_length=LP,
      width=width,
      dtype=dtype,
      fingerprint={},
      codebooks=codebooks,
      shard_passages=SHARD,
  )
  for shard in range(store.num_shards):
    start, stop = store.shard_range(shard)
    store.write_shard(shard, values[start:stop], np.full(stop - start, LP))
  store.finalize()
  return values


def _reader(path) -> ShardRowReader:
  values_dir = path / "values"
  return ShardRowReader.for_zarr_array(
      str(values_dir), json.loads((values_dir / "zarr.json").read_text())
  )


@pytest.mark.parametrize("dtype,width", [("uint8", 4), ("uint16", 6)])
def test_rows_equal_the_written_values_and_tensorstore(tmp_path, dtype, width):
  values = _store(tmp_path, dtype, width)
  reader = _reader(tmp_path)
  rng = np.random.default_rng(1)
  borders = [0, 5, 7, 8, 15, 16, 39, 40, 44]
  for rows in [
      np.arange(N),
      np.array(borders),
      rng.integers(0, N, 30),  # Repeats, any order.
      np.array([], np.int64),
  ]:
    got = reader.read(rows)
    assert got.dtype == np.dtype(dtype) and got.shape == (len(rows), LP, width)
    np.testing.assert_array_equal(got, values[rows])
    np.testing.assert_array_equal(reader.start(rows).result(), values[rows])
  store = MemoryStore.open(str(tmp_path))
  assert store._row_reader is not None
  ids = rng.integers(-1, N, (7, 5))
  fast = store.read(ids)
  store._row_reader = None  # The same store through tensorstore.
  slow = store.read(ids)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)


def test_layouts_it_does_not_know_are_left_to_tensorstore(tmp_path):
  _store(tmp_path / "vectors", "float32", kind="vectors")  # zstd-compressed chunks.
  assert _reader(tmp_path / "vectors") is None
  _store(tmp_path / "codes")
  meta = json.loads((tmp_path / "codes" / "values" / "zarr.json").read_text())
  assert ShardRowReader.for_zarr_array("x", meta) is not None
  variants = [
      lambda m: m["codecs"][0]["configuration"].update(index_location="start"),
      lambda m: m["codecs"][0]["configuration"]["chunk_shape"].__setitem__(0, 2),
      lambda m: m["codecs"][0]["configuration"]["codecs"][0].update(
          configuration={"endian": "big"}
      ),
      lambda m: m["codecs"][0]["configuration"]["codecs"].pop(),  # No checksums.
      lambda m: m.update(codecs=[{"name": "bytes"}]),  # Not sharded.
  ]
  for change in variants:
    changed = json.loads(json.dumps(meta))
    change(changed)
    assert ShardRowReader.for_zarr_array("x", changed) is None, changed


def _shard_file(path, shard):
  return path / "values" / "c" / str(shard) / "0" / "0"


def _rewrite_index(shard_file, change):
  """Rewrites a shard file's index with `change(table)` applied, and its checksum."""
  data = bytearray(shard_file.read_bytes())
  index_bytes = SHARD * 16
  table = np.frombuffer(bytes(data[-index_bytes - 4 : -4]), "<u8").reshape(SHARD, 2).copy()
  chunks = change(table, data)
  raw = table.astype("<u8").tobytes()
  body = data[: -index_bytes - 4] if chunks is None else chunks
  shard_file.write_bytes(bytes(body) + raw + google_crc32c.value(raw).to_bytes(4, "little"))


def test_chunks_in_another_order_read_the_same(tmp_path):
  values = _store(tmp_path)
  chunk = LP * 4 * 2 + 4

  def reverse(table, data):  # Chunks written back to front, the index updated to match.
    body = b"".join(bytes(data[o : o + chunk]) for o in table[::-1, 0].tolist())
    table[:, 0] = np.arange(SHARD)[::-1] * chunk
    return body

  _rewrite_index(_shard_file(tmp_path, 1), reverse)
  np.testing.assert_array_equal(_reader(tmp_path).read(np.arange(4, 20)), values[4:20])

  def shift(table, data):  # 3 bytes of padding first: offsets not a multiple of a chunk.
    table[:, 0] += 3
    return b"pad" + bytes(data[: -SHARD * 16 - 4])

  _rewrite_index(_shard_file(tmp_path, 2), shift)
  reader = _reader(tmp_path)
  np.testing.assert_array_equal(reader.read(np.arange(0, 26)), values[:26])
  assert not reader._open[2].in_order and not reader._open[1].in_order
  assert reader._open[0].in_order


def test_a_corrupt_chunk_is_an_error_for_its_row_only(tmp_path):
  values = _store(tmp_path)
  shard_file = _shard_file(tmp_path, 2)
  data = bytearray(shard_file.read_bytes())
  data[(LP * 4 * 2 + 4) * 3 + 1] ^= 0xFF  # Inside row 16 + 3.
  shard_file.write_bytes(bytes(data))
  reader = _reader(tmp_path)
  np.testing.assert_array_equal(reader.read(np.array([16, 18, 20])), values[[16, 18, 20]])
  with pytest.raises(ShardReadError, match=r"c/2/0/0: row 19 fails its crc32c check") as e:
    reader.read(np.array([3, 19]))
  assert e.value.shard == 2


def test_a_bad_index_a_missing_chunk_a_short_or_absent_file_name_the_file(tmp_path):
  _store(tmp_path)
  data = bytearray(_shard_file(tmp_path, 0).read_bytes())
  data[-10] ^= 0xFF
  _shard_file(tmp_path, 0).write_bytes(bytes(data))
  with pytest.raises(ShardReadError, match=r"c/0/0/0: its chunk index fails its crc32c"):
    _reader(tmp_path).read(np.array([1]))

  def drop_row_2(table, data):
    table[2] = 2**64 - 1

  _rewrite_index(_shard_file(tmp_path, 1), drop_row_2)
  reader = _reader(tmp_path)
  reader.read(np.array([8, 9, 11]))
  with pytest.raises(ShardReadError, match=r"c/1/0/0: no chunk for row 10"):
    reader.read(np.array([10]))

  def too_long(table, data):
    table[4, 1] += 1

  _rewrite_index(_shard_file(tmp_path, 3), too_long)
  with pytest.raises(ShardReadError, match=r"c/3/0/0: chunk 4 at byte \d+ of 29 bytes"):
    _reader(tmp_path).read(np.array([24]))
  _shard_file(tmp_path, 4).write_bytes(b"short")
  with pytest.raises(ShardReadError, match=r"c/4/0/0: 5 bytes, shorter than its index"):
    _reader(tmp_path).read(np.array([33]))
  _shard_file(tmp_path, 5).unlink()
  with pytest.raises(ShardReadError, match=r"c/5/0/0 cannot be mapped") as e:
    _reader(tmp_path).read(np.array([44]))
  assert e.value.shard == 5


def test_open_shards_hold_no_file_descriptors_and_unmap_when_evicted(tmp_path, monkeypatch):
  values = _store(tmp_path)
  monkeypatch.setattr(shard_rows, "MAX_OPEN_SHARDS", 3)
  descriptors = len(os.listdir("/proc/self/fd"))
  reader = _reader(tmp_path)
  np.testing.assert_array_equal(reader.read(np.arange(N)), values)
  assert len(reader._open) == 3 and len(os.listdir("/proc/self/fd")) == descriptors
  mapped = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
  assert len(mapped) == 3  # The evicted shards' maps are gone.


def test_open_shards_are_bounded(tmp_path, monkeypatch):
  values = _store(tmp_path)
  monkeypatch.setattr(shard_rows, "MAX_OPEN_SHARDS", 2)
  reader = _reader(tmp_path)
  for rows in (np.arange(N), np.array([44]), np.array([1]), np.array([9, 1])):
    np.testing.assert_array_equal(reader.read(rows), values[rows])
    assert len(reader._open) <= 2
  assert sorted(reader._open) == [0, 1]  # Shard 5 was read longest ago: it went first.
  assert reader._bases[[2, 3, 4, 5]].sum() == 0 and reader._bases[[0, 1]].all()
  # Copies in flight while later reads evict their shards (they wait for the copies).
  rows = [np.random.default_rng(i).integers(0, N, 50) for i in range(20)]
  pending = [reader.start(r) for r in rows]
  reader.start(np.arange(N))  # Dropped before its result: it is finished all the same.
  for r, p in zip(rows, pending):
    np.testing.assert_array_equal(p.result(), values[r])
