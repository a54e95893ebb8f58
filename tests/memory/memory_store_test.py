"""Memory store: write/finalize/open/read round trips for uint8 and uint16 codes (R = 1 and 2)
and bf16 vectors equal to numpy indexing; resume and refusal on create; every refusal of
open (missing, incomplete, fingerprint, codebooks, shard files) and read (bad ids, deleted or
corrupt shard) names what is wrong; the zarr v3 sharding_indexed layout on disk."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from lumenvq.memory import memory_store
from lumenvq.memory.memory_store import MemoryStore, StoreError

N, LP, SHARD = 50, 6, 16  # 4 shards, the last one partial.
FINGERPRINT = {"checkpoint_step": 1000, "architecture": "lumen_vq", "quantizer": [4, 16, 1]}


def _rows(kind, dtype, width, codebook_size, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, LP + 1, N).astype(np.int32)
  if kind == "codes":
    values = rng.integers(0, codebook_size, (N, LP, width)).astype(dtype)
  else:
    values = rng.normal(size=(N, LP, width)).astype(dtype)
  values[np.arange(LP) >= lengths[:, None]] = 0
  return values, lengths


CASES = {  # kind, dtype, width, num_residual, codebooks shape
    "codes_uint8": ("codes", np.uint8, 4, 1, (4, 16, 3)),
    "codes_uint16_residual": ("codes", np.uint16, 6, 2, (2, 3, 300, 2)),
    "vectors_bf16": ("vectors", ml_dtypes.bfloat16, 8, 1, None),
    # Pruned memory: each token's position, then its R*G = 2*3 codes.
    "codes_residual_positions": ("codes", np.uint8, 7, 2, (2, 3, 16, 2)),
}
POSITIONS = {"codes_residual_positions"}


def _write(path, case, shards=None, finalize=True, fingerprint=FINGERPRINT):
  kind, dtype, width, r, cb_shape = CASES[case]
  codebooks = (
      np.random.default_rng(1).normal(size=cb_shape).astype(np.float32) if cb_shape else None
  )
  values, lengths = _rows(kind, dtype, width, cb_shape[-2] if cb_shape else None)
  store = MemoryStore.create(
      str(path),
      kind=kind,
      num_passages=N,
      passage_length=LP,
      width=width,
      dtype=dtype,
      fingerprint=fingerprint,
      codebooks=codebooks,
      num_residual=r,
      shard_passages=SHARD,
      positions=case in POSITIONS,
  )
  for shard in range(store.num_shards) if shards is None else shards:
    start, stop = store.shard_range(shard)
    store.write_shard(shard, values[start:stop], lengths[start:stop])
  if finalize:
    store.finalize()
  return store, values, lengths, codebooks


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_reads_equal_numpy_indexing(tmp_path, case):
  _, values, lengths, codebooks = _write(tmp_path / "store", case)
  store = MemoryStore.open(str(tmp_path / "store"), expected_fingerprint=FINGERPRINT)
  kind, dtype, width, r, _ = CASES[case]
  assert (
      store.kind,
      store.num_passages,
      store.passage_length,
      store.width,
      store.dtype,
      store.num_residual,
      store.num_shards,
  ) == (kind, N, LP, width, np.dtype(dtype), r, 4)
  assert store.fingerprint == json.loads(json.dumps(FINGERPRINT))
  assert store.positions == (case in POSITIONS)
  if codebooks is None:
    assert store.codebooks is None
  else:
    np.testing.assert_array_equal(store.codebooks, codebooks)
    assert store.codebooks.dtype == np.float32

  rng = np.random.default_rng(2)
  ids = rng.integers(-1, N, (3, 7))
  ids[0, :3] = [5, 5, -1]  # A repeat and an absent passage.
  ids[1, 0] = N - 1  # The last passage of the partial shard.
  got_values, got_lengths = store.read(ids)
  padded_values = np.concatenate([values, np.zeros_like(values[:1])])  # Row -1: zeros.
  padded_lengths = np.concatenate([lengths, [0]])
  want = padded_values[ids]
  if r > 1 and case not in POSITIONS:  # Rows with positions read back as written.
    want = want.reshape(*ids.shape, LP, r, width // r)
  assert got_values.dtype == np.dtype(dtype) and got_lengths.dtype == np.int32
  np.testing.assert_array_equal(got_values, want)
  np.testing.assert_array_equal(got_lengths, padded_lengths[ids])
  for ahead, now in zip(store.start_read(ids).result(), (got_values, got_lengths)):
    np.testing.assert_array_equal(ahead, now)  # Begun on a native thread, the same rows.

  range_values, range_lengths = store.read_range(10, 40)  # Crosses two shard borders.
  np.testing.assert_array_equal(range_values.reshape(30, LP, width), values[10:40])
  np.testing.assert_array_equal(range_lengths, lengths[10:40])
  mask = MemoryStore.mask(got_lengths, LP)
  assert mask.shape == (*ids.shape, LP)
  np.testing.assert_array_equal(mask.sum(-1), got_lengths)
  assert not mask[0, 2].any()


def test_out_of_range_ids_are_named(tmp_path):
  store, *_ = _write(tmp_path / "store", "codes_uint8")
  for bad in (N, -2, 10**9):
    with pytest.raises(StoreError, match=f"passage id {bad} is out of range.*num_passages={N}"):
      store.read(np.array([[0, bad]]))
    with pytest.raises(StoreError, match=f"passage id {bad} is out of range"):
      store.start_read(np.array([[0, bad]]))  # Raised when it starts, not later.
  with pytest.raises(StoreError, match=r"range \[40, 51\)"):
    store.read_range(40, 51)


def test_incomplete_store_is_refused_with_the_count_and_finalize_lists_missing(tmp_path):
  path = str(tmp_path / "store")
  store, *_ = _write(path, "codes_uint8", shards=[0, 2], finalize=False)
  with pytest.raises(StoreError, match="incomplete: 2 of 4 shards done; rerun precompute"):
    MemoryStore.open(path)
  with pytest.raises(StoreError, match="2 of 4 shards are not done: 1, 3"):
    store.finalize()
  assert store.done_shards() == {0, 2} and store.shard_done(2) and not store.shard_done(1)
  with pytest.raises(StoreError, match="no memory store at .*nowhere"):
    MemoryStore.open(str(tmp_path / "nowhere"))


def test_create_resumes_the_same_store_and_refuses_other_settings(tmp_path):
  path = str(tmp_path / "store")
  _, values, lengths, codebooks = _write(path, "codes_uint8", shards=[1], finalize=False)
  kind, dtype, width, r, _ = CASES["codes_uint8"]
  args = dict(
      kind=kind,
      num_passages=N,
      passage_length=LP,
      width=width,
      dtype=dtype,
      codebooks=codebooks,
      shard_passages=SHARD,
  )
  again = MemoryStore.create(path, fingerprint=FINGERPRINT, **args)
  assert again.done_shards() == {1}  # Kept: a resumed precompute skips it.
  for shard in (0, 2, 3):
    start, stop = again.shard_range(shard)
    again.write_shard(shard, values[start:stop], lengths[start:stop])
  again.finalize()
  np.testing.assert_array_equal(MemoryStore.open(path).read(np.arange(N))[0], values)
  other = dict(FINGERPRINT, checkpoint_step=2000)
  with pytest.raises(StoreError, match="already exists with other settings: fingerprint"):
    MemoryStore.create(path, fingerprint=other, **args)
  with pytest.raises(StoreError, match="shard_passages: store has 16, requested 8"):
    MemoryStore.create(path, fingerprint=FINGERPRINT, **dict(args, shard_passages=8))
  with pytest.raises(StoreError, match="other codebooks"):
    MemoryStore.create(path, fingerprint=FINGERPRINT, **dict(args, codebooks=codebooks + 1))


def test_fingerprint_mismatch_names_the_field_and_both_values(tmp_path):
  path = str(tmp_path / "store")
  _write(path, "codes_uint8")
  with pytest.raises(
      StoreError, match="fingerprint field 'checkpoint_step': store has 1000, " "model has 2000"
  ):
    MemoryStore.open(path, expected_fingerprint=dict(FINGERPRINT, checkpoint_step=2000))
  # Only the fields the caller gives are compared.
  assert MemoryStore.open(path, expected_fingerprint={"architecture": "lumen_vq"})


@pytest.mark.parametrize("case", ["vectors_bf16", "codes_uint8"])  # tensorstore, shard_rows.
def test_deleted_or_corrupt_shard_file_names_the_shard(tmp_path, case):
  path = tmp_path / "store"
  store, *_ = _write(path, case)
  store = MemoryStore.open(str(path))
  shard_file = path / "values" / "c" / "2" / "0" / "0"
  data = bytearray(shard_file.read_bytes())
  data[10] ^= 0xFF  # Inside the first inner chunk (passage 32) of the shard.
  shard_file.write_bytes(bytes(data))
  store.read([0, 1])  # Other shards still read.
  with pytest.raises(
      StoreError,
      match=r"shard 2 \(passages 32..47, file values/c/2/0/0\) "
      r"cannot be read: .*([Dd]igest|row 32 fails its crc32c)",
  ):
    store.read([0, 32])
  with pytest.raises(StoreError, match=r"shard 2 \(passages 32..47, file values/c/2/0/0\) "):
    store.start_read([0, 32]).result()
  os.remove(shard_file)
  with pytest.raises(StoreError, match=r"shard 2 .* cannot be read: .*missing"):
    store.read_range(30, 34)  # Deleted after open: not read as zeros.
  with pytest.raises(
      StoreError, match=r"shard 2 \(passages 32..47\) has no file " "values/c/2/0/0"
  ):
    MemoryStore.open(str(path))
  os.remove(path / "lengths" / "c" / "1")
  with pytest.raises(StoreError, match="shard 1 .*has no file lengths/c/1"):
    MemoryStore.open(str(path))


def test_lengths_are_read_whole_at_open(tmp_path):
  path = tmp_path / "store"
  written, _, lengths, _ = _write(path, "codes_uint8")
  with pytest.raises(StoreError, match="open it with MemoryStore.open to read it"):
    written.read([0])  # A store being written has no lengths in memory.
  store = MemoryStore.open(str(path))
  lengths_file = path / "lengths" / "c" / "1"
  data = bytearray(lengths_file.read_bytes())
  data[0] ^= 0xFF
  lengths_file.write_bytes(bytes(data))
  np.testing.assert_array_equal(store.read([20, -1])[1], [lengths[20], 0])  # Read at open.
  with pytest.raises(
      StoreError,
      match=r"shard 1 \(passages 16..31, file lengths/c/1\) " r"cannot be read: .*[Dd]igest",
  ):
    MemoryStore.open(str(path))


def test_codebooks_that_do_not_fit_the_codes_are_refused(tmp_path):
  common = dict(
      kind="codes", num_passages=N, passage_length=LP, fingerprint={}, shard_passages=SHARD
  )
  cases = [  # width, dtype, codebooks shape, R, message
      (
          4,
          np.uint8,
          (4, 300, 3),
          1,
          "C=300 codes per subspace, which take uint16 codes, but " "the codes are uint8",
      ),
      (4, np.uint16, (4, 16, 3), 1, "C=16 .* take uint8 codes, but the codes are uint16"),
      (5, np.uint8, (4, 16, 3), 1, r"shape \(4, 16, 3\) do not match the codes: width 5"),
      (8, np.uint8, (4, 16, 3), 2, r"expected \[R, G, C, s\] for num_residual=2"),
      (4, np.uint8, None, 1, "codebooks of shape None"),
  ]
  for width, dtype, shape, r, message in cases:
    codebooks = None if shape is None else np.zeros(shape, np.float32)
    with pytest.raises(StoreError, match=message):
      MemoryStore.create(
          str(tmp_path / "bad"),
          width=width,
          dtype=dtype,
          codebooks=codebooks,
          num_residual=r,
          **common,
      )
  with pytest.raises(StoreError, match=r"width 4 = R\*G .* \(after the position column\)"):
    MemoryStore.create(  # 5 values, the first a position: 4 codes, not the codebooks' 5.
        str(tmp_path / "bad"),
        width=5,
        dtype=np.uint8,
        codebooks=np.zeros((5, 16, 3), np.float32),
        positions=True,
        **common,
    )
  with pytest.raises(StoreError, match="kind='vectors' takes no codebooks, num_residual=1 and no"):
    MemoryStore.create(
        str(tmp_path / "bad"),
        width=4,
        dtype=np.float32,
        positions=True,
        **{**common, "kind": "vectors"},
    )
  # On open: codebooks replaced on disk by ones of another C.
  path = tmp_path / "store"
  _write(path, "codes_uint8")
  meta = json.loads((path / "codebooks" / "zarr.json").read_text())
  meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [4, 300, 3]
  (path / "codebooks" / "zarr.json").write_text(json.dumps(meta))
  os.remove(path / "codebooks" / "c" / "0" / "0" / "0")
  with pytest.raises(StoreError, match="codebooks"):
    MemoryStore.open(str(path))


def test_write_shard_refuses_wrong_dtype_shape_and_lengths(tmp_path):
  store, values, lengths, _ = _write(tmp_path / "store", "codes_uint8", shards=[], finalize=False)
  with pytest.raises(StoreError, match="shard 0 values are uint16, the store holds uint8"):
    store.write_shard(0, values[:16].astype(np.uint16), lengths[:16])
  with pytest.raises(
      StoreError, match=r"shard 3 values of shape \(16, 6, 4\), expected " r"\(2, 6, 4\)"
  ):
    store.write_shard(3, values[:16], lengths[:16])
  with pytest.raises(StoreError, match=r"shard 0 lengths must be \[16\] in \[0, 6\]"):
    store.write_shard(0, values[:16], lengths[:16] + LP)
  with pytest.raises(StoreError, match=r"shard 4 out of range \(num_shards=4\)"):
    store.shard_range(4)
  assert store.done_shards() == set()


def test_layout_is_zarr3_sharding_indexed_one_file_per_shard(tmp_path):
  path = tmp_path / "store"
  store, *_ = _write(path, "codes_uint16_residual")
  meta = json.loads((path / "values" / "zarr.json").read_text())
  assert meta["zarr_format"] == 3 and meta["data_type"] == "uint16"
  assert meta["shape"] == [N, LP, 6]
  assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD, LP, 6]
  (codec,) = meta["codecs"]
  assert codec["name"] == "sharding_indexed"
  assert codec["configuration"]["chunk_shape"] == [1, LP, 6]  # One passage per inner chunk.
  assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "crc32c"]
  _write(tmp_path / "vectors", "vectors_bf16")  # Vectors are compressed, codes are not.
  vectors_meta = json.loads((tmp_path / "vectors" / "values" / "zarr.json").read_text())
  assert [c["name"] for c in vectors_meta["codecs"][0]["configuration"]["codecs"]] == [
      "bytes",
      "zstd",
      "crc32c",
  ]
  lengths_meta = json.loads((path / "lengths" / "zarr.json").read_text())
  assert lengths_meta["codecs"][0]["name"] == "sharding_indexed"
  assert lengths_meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD]
  files = lambda d: sorted(
      os.path.relpath(os.path.join(r, f), path / d)  # noqa: E731
      for r, _, fs in os.walk(path / d)
      for f in fs
  )
  assert files("values") == ["c/0/0/0", "c/1/0/0", "c/2/0/0", "c/3/0/0", "zarr.json"]
  assert files("lengths") == ["c/0", "c/1", "c/2", "c/3", "zarr.json"]
  assert files("done") == ["0", "1", "2", "3"]
  assert (path / memory_store.COMPLETE).exists()
  on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  assert store.bytes_on_disk() == on_disk > N * LP * 6 * 2 + N * 4
