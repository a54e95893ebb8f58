"""The precomputed memory store: LUMEN memory vectors or LUMEN-VQ codes per passage, on disk.

Written once by `precompute_memory`, read by the host reader and the device-resident table.
A store is a tensorstore kvstore prefix (a local directory, or `gs://bucket/prefix`) holding

  store.json  kind ("codes" | "vectors"), shape, dtype, shard size, residual stages and the
              `fingerprint` of what made it (checkpoint step, architecture, quantizer,
              vocabulary and passage table hashes); written when the store is created
  values/     zarr v3 [num_passages, passage_length, width]: uint8/uint16 codes (width R*G)
              or float vectors (width d); positions past a passage's length are zero. A
              store of pruned memory (`positions` in store.json) keeps per token its
              position in the passage and then its codes (width 1 + R*G): its
              passage_length is the kept length M, and rows hold each passage's M kept
              tokens (fewer for shorter passages, `lengths`)
  lengths/    zarr v3 int32 [num_passages]: real tokens per passage; `open` reads it whole
              into host memory (4 bytes a passage: 400 MB for 1e8 passages), so a read of
              passages makes one tensorstore call, of their values only
  codebooks/  zarr v3 float32 [G, C, s] or [R, G, C, s] (codes only)
  done/<i>    a marker per finished shard, written after its values and lengths are durable
  COMPLETE    written last, once every shard is done; readers refuse a store without it

Both arrays use the `sharding_indexed` codec: one file per `shard_passages` passages (so
1e8 passages stay a few 10k files) with one inner chunk per passage, so a random passage
is one small byte-range read. Vector chunks are zstd-compressed (level 1: bf16 vectors
shrink ~22% and 512 random rows read no slower, measured on 4096 x 128 x 256 normal
values); codes are not (uniformly used uint16 codes do not shrink at all). Every inner
chunk carries a crc32c, so a corrupt file is an error, not silently wrong memory; missing
chunks are read as errors (`fill_missing_data_reads` off) rather than as zeros.
"""

import json
import math
import os
from typing import Callable, Optional

import ml_dtypes
import numpy as np
import tensorstore as ts

from lumenvq import paths
from lumenvq.memory.shard_rows import ShardReadError, ShardRowReader
from lumenvq.quant import pq_codec

FORMAT_VERSION = 1
KINDS = ("codes", "vectors")
STORE_JSON = "store.json"
COMPLETE = "COMPLETE"
DONE_PREFIX = "done/"
LENGTHS_INNER_CHUNK = 64  # Passages per inner chunk of `lengths`: 256 B, cheap to read.
READ_CACHE_BYTES = 64 << 20  # Shard indices and rows read recently (the store is immutable).
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC = {"name": "crc32c"}
_ZSTD = {"name": "zstd", "configuration": {"level": 1, "checksum": False}}


class StoreError(ValueError):
  """A memory store that is missing, incomplete, inconsistent, or asked for what it lacks."""


def kvstore_spec(path: str) -> dict:
  """`gs://bucket/prefix` -> the gcs kvstore driver; anything else is a local directory."""
  if path.startswith("gs://"):
    bucket, _, prefix = path[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _json_normal(obj):
  """As it reads back from store.json (tuples become lists, keys strings)."""
  return json.loads(json.dumps(obj, sort_keys=True))


def _differences(stored: dict, wanted: dict) -> list:
  return [
      (k, stored.get(k), wanted.get(k))
      for k in sorted(set(stored) | set(wanted))
      if stored.get(k) != wanted.get(k)
  ]


def _check_codebooks(path, codebooks, width, dtype, num_residual, positions=False):
  """Codebooks [G, C, s] (R = 1) or [R, G, C, s] whose R*G is the code width (after the
  position column when `positions`) and whose C needs exactly the code dtype."""
  width -= int(positions)
  want_ndim = 3 if num_residual == 1 else 4
  if codebooks is None or codebooks.ndim != want_ndim:
    shape = None if codebooks is None else tuple(codebooks.shape)
    raise StoreError(
        f"memory store {path}: codebooks of shape {shape}, expected "
        f"{'[G, C, s]' if want_ndim == 3 else '[R, G, C, s]'} for "
        f"num_residual={num_residual}"
    )
  r = 1 if want_ndim == 3 else codebooks.shape[0]
  g, c = codebooks.shape[-3], codebooks.shape[-2]
  if r != num_residual or r * g != width:
    raise StoreError(
        f"memory store {path}: codebooks of shape {tuple(codebooks.shape)} do not "
        f"match the codes: width {width} = R*G with R = num_residual = "
        f"{num_residual}" + (" (after the position column)" if positions else "")
    )
  try:
    code_dtype = pq_codec.code_dtype(c)
  except ValueError as e:
    raise StoreError(f"memory store {path}: codebooks: {e}") from e
  if code_dtype != dtype:
    raise StoreError(
        f"memory store {path}: codebooks have C={c} codes per subspace, which "
        f"take {code_dtype.name} codes, but the codes are {dtype.name}"
    )


def _array_spec(
    kv: dict, key: str, shape, dtype, chunk, inner, extra_context=None, compress=False
) -> dict:
  codecs = [_BYTES, _ZSTD, _CRC] if compress else [_BYTES, _CRC]
  spec = {
      "driver": "zarr3",
      "kvstore": {**kv, "path": kv["path"] + key + "/"},
      "metadata": {
          "shape": list(shape),
          "data_type": dtype.name,
          "fill_value": 0,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
          "codecs": codecs
          if inner is None
          else [
              {
                  "name": "sharding_indexed",
                  "configuration": {
                      "chunk_shape": list(inner),
                      "codecs": codecs,
                      "index_codecs": [_BYTES, _CRC],
                      "index_location": "end",
                  },
              }
          ],
      },
      # Every shard file exists, even one of zeros, and a missing one reads as an error.
      "store_data_equal_to_fill_value": True,
      "fill_missing_data_reads": False,
  }
  if extra_context:  # A reader's cache. What it caches is never revalidated: a COMPLETE
    # store does not change, and the file stat each read costs otherwise took ~40% of
    # the time of reading 64 random passages (benchmarks/memory_store.py).
    spec.update(context=extra_context, recheck_cached_data="open", recheck_cached_metadata="open")
  return spec


class MemoryStore:
  """One memory store (module docstring). `create` for the writer, `open` for readers."""

  def __init__(self, path: str, meta: dict, create: bool = False):
    """Use `create` or `open`."""
    self.path = path
    self._meta = meta
    self.kind = meta["kind"]
    self.num_passages = int(meta["num_passages"])
    self.passage_length = int(meta["passage_length"])
    self.width = int(meta["width"])
    self.dtype = _dtype(meta["dtype"])
    self.num_residual = int(meta["num_residual"])
    self.positions = bool(meta.get("positions", False))  # Stores before it had none.
    self.shard_passages = int(meta["shard_passages"])
    self.fingerprint = meta["fingerprint"]
    self.num_shards = math.ceil(self.num_passages / self.shard_passages)
    self._kv_spec = kvstore_spec(path)
    self._kv = ts.KvStore.open(self._kv_spec).result()
    context = None if create else {"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}}
    s, lp, w = self.shard_passages, self.passage_length, self.width
    mode = dict(create=True, delete_existing=True) if create else dict(open=True)
    self._values = ts.open(
        _array_spec(
            self._kv_spec,
            "values",
            (self.num_passages, lp, w),
            self.dtype,
            (s, lp, w),
            (1, lp, w),
            context,
            compress=self.kind == "vectors",
        ),
        **mode,
    )
    self._lengths = ts.open(
        _array_spec(
            self._kv_spec,
            "lengths",
            (self.num_passages,),
            np.dtype(np.int32),
            (s,),
            (math.gcd(s, LENGTHS_INNER_CHUNK),),
            context,
        ),
        **mode,
    )
    try:
      self._values, self._lengths = self._values.result(), self._lengths.result()
    except ValueError as e:
      raise StoreError(
          f"memory store {path}: arrays values/ and lengths/ do not open as "
          f"{STORE_JSON} describes them: {e}"
      ) from e
    self.codebooks = None
    self._all_lengths = None  # int32 [num_passages] on the host, once `open` has read it.
    # Random rows of a local uncompressed (codes) store come straight from the shard files.
    self._row_reader = None
    if not create and self._kv_spec["driver"] == "file":
      self._row_reader = ShardRowReader.for_zarr_array(
          os.path.join(self._kv_spec["path"], "values"), _read_json(self._kv, "values/zarr.json")
      )

  # -- Creation and writing.

  @classmethod
  def create(
      cls,
      path,
      *,
      kind,
      num_passages,
      passage_length,
      width,
      dtype,
      fingerprint,
      codebooks=None,
      num_residual=1,
      shard_passages=4096,
      positions=False,
  ) -> "MemoryStore":
    """A new empty store; or, when `path` already holds one with the same metadata (and
    codebooks), that store with its finished shards (a resumed precompute). A store with
    other metadata is a StoreError naming the fields."""
    dtype = _dtype(dtype)
    if kind not in KINDS:
      raise StoreError(f"memory store {path}: kind={kind!r}, expected one of {KINDS}")
    for name, value in (
        ("num_passages", num_passages),
        ("passage_length", passage_length),
        ("width", width),
        ("shard_passages", shard_passages),
        ("num_residual", num_residual),
    ):
      if int(value) < 1:
        raise StoreError(f"memory store {path}: {name}={value} must be >= 1")
    if kind == "codes":
      codebooks = np.asarray(codebooks, np.float32) if codebooks is not None else None
      _check_codebooks(path, codebooks, width, dtype, num_residual, positions)
    else:
      if codebooks is not None or num_residual != 1 or positions:
        raise StoreError(
            f"memory store {path}: kind='vectors' takes no codebooks, num_residual=1 and "
            "no positions"
        )
      if not np.issubdtype(dtype, np.floating) and dtype != np.dtype(ml_dtypes.bfloat16):
        raise StoreError(
            f"memory store {path}: vectors of dtype {dtype.name}, expected a " "float type"
        )
    meta = _json_normal(
        {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "num_passages": int(num_passages),
            "passage_length": int(passage_length),
            "width": int(width),
            "dtype": dtype.name,
            "shard_passages": int(shard_passages),
            "num_residual": int(num_residual),
            "fingerprint": fingerprint,
            **({"positions": True} if positions else {}),
        }
    )
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    existing = _read_json(kv, STORE_JSON)
    if existing is not None:
      diff = _differences(existing, meta)
      if diff:
        raise StoreError(
            f"memory store {path} already exists with other settings: "
            + "; ".join(f"{k}: store has {a!r}, requested {b!r}" for k, a, b in diff)
            + " (delete it, or choose another STORE_PATH)"
        )
      store = cls(path, meta)
      if kind == "codes":
        store.codebooks = store._read_codebooks()
        if not np.array_equal(store.codebooks, codebooks):
          raise StoreError(
              f"memory store {path} already exists with other codebooks "
              "(delete it, or choose another STORE_PATH)"
          )
      return store
    # A fresh store: clear what an earlier attempt without store.json may have left.
    for prefix in (DONE_PREFIX, "values/", "lengths/", "codebooks/"):
      kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord("/") + 1))).result()
    kv.write(COMPLETE, None).result()
    store = cls(path, meta, create=True)
    if kind == "codes":
      cb = ts.open(
          _array_spec(
              store._kv_spec,
              "codebooks",
              codebooks.shape,
              np.dtype(np.float32),
              codebooks.shape,
              None,
          ),
          create=True,
          delete_existing=True,
      ).result()
      cb.write(codebooks).result()
      store.codebooks = codebooks
    kv.write(STORE_JSON, json.dumps(meta, indent=2, sort_keys=True)).result()  # Last.
    return store

  def shard_range(self, shard: int) -> tuple:
    """Passages [start, stop) of a shard."""
    if not 0 <= shard < self.num_shards:
      raise StoreError(
          f"memory store {self.path}: shard {shard} out of range (num_shards=" f"{self.num_shards})"
      )
    start = shard * self.shard_passages
    return start, min(start + self.shard_passages, self.num_passages)

  def done_shards(self) -> set:
    """Indices of the shards with a completion marker (one listing, not one read each)."""
    keys = self._kv.list(ts.KvStore.KeyRange(DONE_PREFIX, "done0")).result()
    return {int(k.decode()[len(DONE_PREFIX) :]) for k in keys}

  def shard_done(self, shard) -> bool:
    self.shard_range(shard)
    return self._kv.read(f"{DONE_PREFIX}{shard}").result().state == "value"

  def write_shard(
      self, shard, values: np.ndarray, lengths: np.ndarray, marker: Optional[dict] = None
  ) -> None:
    """Writes a whole shard, waits until both arrays are durable, then marks it done.
    `marker` adds fields to the done marker (e.g. the writing process)."""
    start, stop = self.shard_range(shard)
    n, lp, w = stop - start, self.passage_length, self.width
    values, lengths = np.asarray(values), np.asarray(lengths)
    if values.dtype != self.dtype:
      raise StoreError(
          f"memory store {self.path}: shard {shard} values are {values.dtype}, "
          f"the store holds {self.dtype.name}"
      )
    if values.shape[:2] != (n, lp) or int(np.prod(values.shape[2:])) != w:
      raise StoreError(
          f"memory store {self.path}: shard {shard} values of shape "
          f"{values.shape}, expected ({n}, {lp}, {w})"
      )
    if lengths.shape != (n,) or lengths.size and not (0 <= lengths.min() and lengths.max() <= lp):
      raise StoreError(
          f"memory store {self.path}: shard {shard} lengths must be [{n}] in " f"[0, {lp}]"
      )
    futures = [
        self._values[start:stop].write(values.reshape(n, lp, w)),
        self._lengths[start:stop].write(lengths.astype(np.int32)),
    ]
    for future in futures:
      future.result()
    record = {"shard": shard, "start": start, "stop": stop, **(marker or {})}
    self._kv.write(f"{DONE_PREFIX}{shard}", json.dumps(record, sort_keys=True)).result()

  def finalize(self) -> None:
    """Writes COMPLETE when every shard is done; else a StoreError listing the missing."""
    missing = sorted(set(range(self.num_shards)) - self.done_shards())
    if missing:
      shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
      raise StoreError(
          f"memory store {self.path}: cannot finalize, {len(missing)} of "
          f"{self.num_shards} shards are not done: {shown}"
      )
    self._kv.write(
        COMPLETE, json.dumps({"num_shards": self.num_shards, "num_passages": self.num_passages})
    ).result()

  # -- Opening and reading.

  @classmethod
  def open(cls, path, expected_fingerprint: Optional[dict] = None) -> "MemoryStore":
    """A COMPLETE store, checked against `expected_fingerprint` (only the fields it has; see
    `store_fingerprint`), its codebooks and the presence of every shard file."""
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    meta = _read_json(kv, STORE_JSON)
    if meta is None:
      raise StoreError(
          f"no memory store at {path} ({STORE_JSON} is missing): make it with "
          "python -m lumenvq.precompute_memory"
      )
    if meta.get("format_version") != FORMAT_VERSION:
      raise StoreError(
          f"memory store {path} has format_version {meta.get('format_version')}"
          f"; this code reads {FORMAT_VERSION}: precompute it again"
      )
    store = cls(path, meta)
    if kv.read(COMPLETE).result().state != "value":
      raise StoreError(
          f"memory store {path} is incomplete: {len(store.done_shards())} of "
          f"{store.num_shards} shards done; rerun precompute_memory"
      )
    if expected_fingerprint is not None:
      wanted = _json_normal(expected_fingerprint)  # Only the fields the reader knows.
      for field, have, want in _differences({k: store.fingerprint.get(k) for k in wanted}, wanted):
        raise StoreError(
            f"memory store {path}: fingerprint field {field!r}: store has "
            f"{have!r}, model has {want!r} (precompute the memory for this "
            "model, or point to its store)"
        )
    if store.kind == "codes":
      store.codebooks = store._read_codebooks()
      _check_codebooks(
          path, store.codebooks, store.width, store.dtype, store.num_residual, store.positions
      )
    store._check_shard_files()
    try:
      store._all_lengths = store._lengths.read().result()
    except ValueError as e:
      store._raise_unreadable(np.arange(store.num_passages), e, which=1)
    return store

  def _read_codebooks(self) -> np.ndarray:
    spec = {
        "driver": "zarr3",
        "fill_missing_data_reads": False,
        "kvstore": {**self._kv_spec, "path": self._kv_spec["path"] + "codebooks/"},
    }
    try:
      return ts.open(spec, open=True).result().read().result()
    except ValueError as e:
      raise StoreError(f"memory store {self.path}: codebooks/ cannot be read: {e}") from e

  def _shard_keys(self, shard: int) -> tuple:
    return (f"values/c/{shard}/0/0", f"lengths/c/{shard}")

  def _check_shard_files(self):
    present = set(
        k.decode() for k in self._kv.list(ts.KvStore.KeyRange("lengths/c/", "values/c0")).result()
    )
    for shard in range(self.num_shards):
      for key in self._shard_keys(shard):
        if key not in present:
          start, stop = self.shard_range(shard)
          raise StoreError(
              f"memory store {self.path}: shard {shard} (passages {start}.."
              f"{stop - 1}) has no file {key}; precompute the store again"
          )

  def _shape(self, lead) -> tuple:
    tail = (
        (self.num_residual, self.width // self.num_residual)
        if self.num_residual > 1 and not self.positions
        else (self.width,)  # With positions: the rows as written, [position, codes].
    )
    return (*lead, self.passage_length, *tail)

  def _host_lengths(self) -> np.ndarray:
    if self._all_lengths is None:
      raise StoreError(
          f"memory store {self.path}: open it with MemoryStore.open to read it "
          "(a store being written has no lengths in memory)"
      )
    return self._all_lengths

  def _values_of(self, ids: np.ndarray, ahead: bool) -> Callable[[], np.ndarray]:
    """values [len(ids), Lp, W] of valid passage ids, in their order, as a call that gives
    them: read now, or (`ahead`) begun on a native thread, the shard files' copy thread or
    tensorstore's (lengths are in memory)."""
    reader = self._row_reader
    if reader is not None and (not ahead or reader.reads_ahead()):
      try:
        rows = reader.start(ids) if ahead else reader.read(ids)
      except ShardReadError as e:
        raise self._unreadable(e.shard, 0, e) from e
      return rows.result if ahead else lambda: rows
    # Sorted unique rows, then reordered: faster than reading the ids in their order (by
    # ~20% for 640 random 4 KB rows and ~25% for 64 random 128 KB rows, reordering copy
    # included; benchmarks/memory_store.py's stores).
    rows, inverse = np.unique(ids, return_inverse=True)

    def result():
      try:
        return future.result()[inverse]
      except ValueError as e:
        self._raise_unreadable(rows, e, which=0)

    try:
      future = self._values.oindex[rows].read()
    except ValueError as e:
      self._raise_unreadable(rows, e, which=0)
    if ahead:
      return result
    values = result()
    return lambda: values

  def _raise_unreadable(self, rows, error, which: int):
    """Names the first shard whose sorted `rows` fail to read from values (`which` 0) or
    lengths (1); the error path only."""
    array = (self._values, self._lengths)[which]
    shards, firsts = np.unique(rows // self.shard_passages, return_index=True)
    for shard, mine in zip(shards, np.split(rows, firsts[1:])):
      try:
        array.oindex[mine].read().result()
      except ValueError as e:
        raise self._unreadable(int(shard), which, e) from e
    raise StoreError(f"memory store {self.path}: read failed: {error}") from error

  def _unreadable(self, shard: int, which: int, error) -> StoreError:
    start, stop = self.shard_range(shard)
    return StoreError(
        f"memory store {self.path}: shard {shard} (passages {start}..{stop - 1}, "
        f"file {self._shard_keys(shard)[which]}) cannot be read: {error}"
    )

  def read(self, ids) -> tuple:
    """(values [*ids.shape, Lp, W] ([..., Lp, R, G] codes when R > 1), lengths [*ids.shape]).

    Id -1 is "no passage": zeros and length 0. Ids may repeat, in any order.
    """
    return self._begin(ids, ahead=False).result()

  def start_read(self, ids) -> "PendingRead":
    """`read(ids)` begun now and given by `.result()`: the rows are copied on a native thread
    meanwhile, so a caller reads ahead without a Python thread of its own. Bad ids raise
    here; a shard that fails to read raises here or from `result()`."""
    return self._begin(ids, ahead=True)

  def _begin(self, ids, ahead: bool) -> "PendingRead":
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind not in "iu":
      raise StoreError(
          f"memory store {self.path}: passage ids of dtype {ids.dtype}, " "expected integers"
      )
    flat = ids.reshape(-1).astype(np.int64)
    lowest, highest = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
    if lowest < -1 or highest >= self.num_passages:
      bad = flat[(flat < -1) | (flat >= self.num_passages)]
      raise StoreError(
          f"memory store {self.path}: passage id {bad[0]} is out of range: the "
          f"store has num_passages={self.num_passages} (ids 0.."
          f"{self.num_passages - 1}; -1 means no passage)"
      )
    shape = self._shape(ids.shape)
    if flat.size and lowest >= 0:  # Every id a passage: no masking.
      lengths = self._host_lengths()[flat].reshape(ids.shape)
      return PendingRead(self._values_of(flat, ahead), lengths, shape)
    present = flat >= 0
    lengths = np.where(present, self._host_lengths()[flat], 0).reshape(ids.shape)  # -1: 0.
    empty = np.zeros((0, self.passage_length, self.width), self.dtype)
    rows = self._values_of(flat[present], ahead) if present.any() else lambda: empty
    return PendingRead(rows, lengths, shape, present)

  def read_range(self, start, stop) -> tuple:
    """Rows [start, stop) in order (e.g. to load a device-resident table)."""
    if not 0 <= start <= stop <= self.num_passages:
      raise StoreError(
          f"memory store {self.path}: range [{start}, {stop}) is not within the "
          f"{self.num_passages} passages"
      )
    lengths = self._host_lengths()[start:stop].copy()
    try:
      values = self._values[start:stop].read().result()
    except ValueError as e:
      self._raise_unreadable(np.arange(start, stop), e, which=0)
    return values.reshape(self._shape((stop - start,))), lengths

  @staticmethod
  def mask(lengths, passage_length) -> np.ndarray:
    """bool [..., Lp]: True at the first `lengths` positions."""
    return np.arange(passage_length) < np.asarray(lengths)[..., None]

  def bytes_on_disk(self) -> int:
    """Every byte under the store, metadata included (local or gs://)."""
    return paths.tree_bytes(self.path)


class PendingRead:
  """A `MemoryStore.read` in flight (`start_read`); `result()` gives (values, lengths)."""

  def __init__(
      self,
      rows: Callable[[], np.ndarray],
      lengths: np.ndarray,
      shape: tuple,
      present: Optional[np.ndarray] = None,
  ):
    """`rows()`: the values of the ids that are passages (`present`; None: every id)."""
    self._rows, self._lengths, self._shape, self._present = rows, lengths, shape, present

  def result(self) -> tuple:
    values = self._rows()
    if self._present is not None:  # Ids -1: zero rows.
      full = np.zeros((self._present.size, *values.shape[1:]), values.dtype)
      full[self._present] = values
      values = full
    return values.reshape(self._shape), self._lengths


def _read_json(kv, key: str) -> Optional[dict]:
  result = kv.read(key).result()
  return json.loads(result.value) if result.state == "value" else None
