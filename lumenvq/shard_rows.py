"""Random rows of a local memory store read straight from its zarr v3 shard files.

Why by hand: tensorstore reads a random passage of a `sharding_indexed` array at a fixed
~3.5-5 us per inner chunk, which held the host reader to 0.1-0.45 of a numpy memmap of the
same codes (benchmarks/memory_store.py). For the layout `memory_store` writes for codes
on a local disk (one uncompressed inner chunk per row, each followed by its crc32c; a
crc32c-checked index of (offset, nbytes) pairs at the end of the shard file), a row is a
byte range of a memory-mapped file: a batch is one copy from the addresses of its rows
(csrc/gather_rows.cc, built by setup.py), or without a compiler a numpy gather per shard and
a reordering copy. Anything else (compressed vector stores, `gs://`) stays with tensorstore.

The checks tensorstore makes stay: the index checksum when a shard is opened, each chunk's
checksum the first time it is read in this process (the store is immutable once COMPLETE,
as tensorstore's cache assumes too), chunk sizes against the metadata, and a missing chunk
is an error, never zeros.
"""
import ctypes
import mmap
import os
import threading
from typing import Optional

import google_crc32c
import numpy as np

from lumenvq import native

CRC_BYTES = 4
_MISSING = np.uint64(2**64 - 1)  # The index's (offset, nbytes) of a chunk never written.
MAX_OPEN_SHARDS = 256  # Each open shard holds a file descriptor (an mmap dups it).


def _load_gather():
  """lumenvq_gather_rows (csrc/gather_rows.cc) when setup.py built it, else None (numpy)."""
  built = native.library("_gather_rows", "host reads copy twice, through numpy")
  if built is None:
    return None
  gather = built.lumenvq_gather_rows
  gather.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
  gather.restype = None
  return gather


_GATHER = _load_gather()


class ShardReadError(ValueError):
  """A shard file that is missing, truncated, corrupt, or lacks a requested row."""

  def __init__(self, shard: int, message: str):
    super().__init__(message)
    self.shard = shard


def _crc(data: np.ndarray) -> int:
  return google_crc32c.value(data)


class _Shard:
  """One shard file: its mapped bytes, its chunk index, and which chunks were verified."""

  def __init__(self, path: str, index: int, rows: int, chunk_bytes: int,
               verified: np.ndarray):
    """`verified`: the reader's flags of this shard's rows (it may hold fewer than `rows`)."""
    self.path, self.index, self.first_row = path, index, index * rows
    try:
      with open(path, "rb") as f:
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file.
      raise ShardReadError(index, f"shard file {path} cannot be mapped: {e}") from e
    # A plain read-only ndarray over the map (np.memmap's subclass costs per index).
    self.data = np.frombuffer(self._map, np.uint8)
    index_bytes = rows * 16 + CRC_BYTES
    if self.data.size < index_bytes:
      raise ShardReadError(index, f"shard file {path}: {self.data.size} bytes, shorter than "
                           f"its index of {rows} chunks ({index_bytes} bytes)")
    raw_index = self.data[-index_bytes:-CRC_BYTES]
    if _crc(raw_index) != int(self.data[-CRC_BYTES:].view("<u4")[0]):
      raise ShardReadError(index, f"shard file {path}: its chunk index fails its crc32c check")
    table = raw_index.view("<u8").reshape(rows, 2)
    self.present = table[:, 0] != _MISSING
    self.offsets, nbytes = table[:, 0].astype(np.int64), table[:, 1]
    self.chunk_bytes, self.stride = chunk_bytes, chunk_bytes + CRC_BYTES
    bad = self.present & ((nbytes != self.stride) | (self.offsets < 0) |
                          (self.offsets + self.stride > self.data.size - index_bytes))
    if bad.any():
      i = int(np.argmax(bad))
      raise ShardReadError(index, f"shard file {path}: chunk {i} at byte {self.offsets[i]} "
                           f"of {nbytes[i]} bytes does not fit the file or the row size "
                           f"{chunk_bytes} + {CRC_BYTES}")
    # tensorstore writes the chunks back to back in row order: then chunk i is row i of a
    # [-1, stride] view of the file, and a batch of chunks is one np.take.
    self.in_order = bool(np.array_equal(self.offsets[self.present],
                                        np.flatnonzero(self.present) * self.stride))
    self.by_row = self.data[:self.data.size // self.stride * self.stride].reshape(
        -1, self.stride) if self.in_order else None
    self.base = np.uint64(self.data.ctypes.data)
    self.verified = verified
    self.unverified = int((~verified).sum())  # None left: no check per read.

  def copy(self, inner: np.ndarray, out: np.ndarray) -> None:
    """Copies chunks `inner`, each with its crc32c, into `out` (uint8 [len(inner), stride])."""
    self.verify(inner)
    if self.in_order:  # A contiguous source: np.take copies only the rows taken.
      self.by_row.take(inner, axis=0, out=out)
    else:  # Another writer's chunk order: one slice per row.
      for j, start in enumerate(self.offsets[inner]):
        out[j] = self.data[start:start + self.stride]

  def verify(self, inner: np.ndarray) -> None:
    """Presence and crc32c of the chunks `inner` not verified before."""
    if not self.unverified:
      return
    for i in inner[~self.verified[inner]]:
      if not self.present[i]:
        raise ShardReadError(self.index, f"shard file {self.path}: no chunk for row "
                             f"{self.first_row + int(i)}")
      start = self.offsets[i]
      stored = int(self.data[start + self.chunk_bytes:start + self.stride].view("<u4")[0])
      if _crc(self.data[start:start + self.chunk_bytes]) != stored:
        raise ShardReadError(self.index, f"shard file {self.path}: row "
                             f"{self.first_row + int(i)} fails its crc32c check (corrupt)")
      self.verified[i] = True
      self.unverified -= 1


class ShardRowReader:
  """Rows of one local zarr v3 array `[N, *row_shape]` of `dtype`, sharded along its first
  axis into `shard_rows` rows per file, one uncompressed inner chunk per row; shard `k`'s
  file is `shard_path(k)`."""

  def __init__(self, shard_path, num_rows: int, shard_rows: int, row_shape: tuple,
               dtype: np.dtype):
    self.shard_path, self.num_rows, self.shard_rows = shard_path, num_rows, shard_rows
    self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
    self.chunk_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
    num_shards = -(-num_rows // shard_rows)
    self._open = {}  # shard -> _Shard
    self._used = np.zeros(num_shards, np.int64)  # When each shard was last read (a clock).
    self._clock = 0
    # The start address of each open shard written in row order, 0 otherwise; and each
    # row's checksum verified: with both, a batch needs no Python per shard.
    self._bases = np.zeros(num_shards, np.uint64)
    self._verified = np.zeros(num_rows, bool)  # 1 byte a row (lengths take 4).
    self._lock = threading.Lock()  # Readers on several threads share the open shards.
    self._local = threading.local()

  @classmethod
  def for_zarr_array(cls, directory: str, metadata: dict) -> Optional["ShardRowReader"]:
    """A reader for the array in local `directory` with zarr.json `metadata`, or None when
    its layout is not the one this reader knows (then read it with tensorstore)."""
    shape = metadata.get("shape", [])
    grid = metadata.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
    codecs = metadata.get("codecs", [])
    if (len(shape) < 2 or len(grid) != len(shape) or list(grid[1:]) != list(shape[1:]) or
        len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or
        metadata.get("chunk_key_encoding", {}).get("name") != "default"):
      return None
    config = codecs[0].get("configuration", {})
    dtype = np.dtype(metadata.get("data_type", "V"))
    inner = [c.get("name") for c in config.get("codecs", [])]
    little = all(c.get("configuration", {}).get("endian", "little") == "little"
                 for c in config.get("codecs", []) + config.get("index_codecs", []))
    if (config.get("chunk_shape") != [1, *shape[1:]] or inner != ["bytes", "crc32c"] or
        [c.get("name") for c in config.get("index_codecs", [])] != ["bytes", "crc32c"] or
        config.get("index_location", "end") != "end" or not little or
        dtype.kind not in "uif"):
      return None
    trailing = "/".join("0" for _ in shape[1:])
    return cls(lambda k: os.path.join(directory, "c", str(k), trailing), shape[0], grid[0],
               shape[1:], dtype)

  def _shard(self, k: int) -> _Shard:
    """Shard k, opened if needed, evicting the least recently read one (under the lock)."""
    shard = self._open.get(k)
    if shard is None:
      rows = self._verified[k * self.shard_rows:(k + 1) * self.shard_rows]
      shard = _Shard(self.shard_path(k), k, self.shard_rows, self.chunk_bytes, rows)
      if len(self._open) >= MAX_OPEN_SHARDS:
        oldest = min(self._open, key=self._used.__getitem__)
        del self._open[oldest]
        self._bases[oldest] = 0
      self._open[k] = shard
      if shard.in_order:
        self._bases[k] = shard.base
    return shard

  def read(self, ids: np.ndarray) -> np.ndarray:
    """[len(ids), *row_shape] for row indices in [0, num_rows), in their order (repeats
    allowed)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    shards = ids // self.shard_rows
    inner = ids - shards * self.shard_rows
    out = np.empty((ids.size, self.chunk_bytes), np.uint8)
    with self._lock:  # Also while copying: no shard is unmapped under the copy.
      self._clock += 1
      self._used[shards] = self._clock
      if _GATHER is not None:
        bases = self._bases[shards]
        if not (bases.all() and self._verified[ids].all()):  # Open and verify first.
          for k in np.unique(shards).tolist():
            self._shard(k).verify(inner[shards == k])
          bases = self._bases[shards]
        if bases.all():  # Every shard open and in row order: one copy, in the order asked.
          sources = bases + inner.astype(np.uint64) * np.uint64(self.chunk_bytes + CRC_BYTES)
          _GATHER(sources.ctypes.data, ids.size, self.chunk_bytes, out.ctypes.data)
          return out.view(self.dtype).reshape(ids.size, *self.row_shape)
      # Without the C gather, or with a shard in another writer's chunk order (or more
      # shards than stay open): sorted by shard, copied by numpy, scattered into order.
      order = np.argsort(ids, kind="stable")
      sorted_shards, sorted_inner = shards[order], inner[order]
      scratch = self._scratch(ids.size)
      starts = [0, *(np.flatnonzero(np.diff(sorted_shards)) + 1).tolist()] if ids.size else []
      for lo, hi, k in zip(starts, starts[1:] + [ids.size], sorted_shards[starts].tolist()):
        self._shard(k).copy(sorted_inner[lo:hi], scratch[lo:hi])
      out[order] = scratch[:, :self.chunk_bytes]
    return out.view(self.dtype).reshape(ids.size, *self.row_shape)

  def _scratch(self, n: int) -> np.ndarray:
    """uint8 [n, chunk + crc32c] reused by this thread's reads: a fresh buffer each read cost
    more in page faults than the copy (a 256 KB batch took 2x a numpy memmap read)."""
    buffer = getattr(self._local, "scratch", None)
    if buffer is None or len(buffer) < n:
      buffer = np.empty((max(n, 2 * len(buffer) if buffer is not None else n),
                         self.chunk_bytes + CRC_BYTES), np.uint8)
      self._local.scratch = buffer
    return buffer[:n]
