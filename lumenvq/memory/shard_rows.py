"""Random rows of a local memory store read straight from its zarr v3 shard files.

Why by hand: tensorstore reads a random passage of a `sharding_indexed` array at a fixed
~3.5-5 us per inner chunk, which held the host reader to 0.1-0.45 of a numpy memmap of the
same codes (benchmarks/memory_store.py). For the layout `memory_store` writes for codes
on a local disk (one uncompressed inner chunk per row, each followed by its crc32c; a
crc32c-checked index of (offset, nbytes) pairs at the end of the shard file), a row is a
byte range of a memory-mapped file: a batch is one copy from the addresses of its rows
(csrc/gather_rows.cc, built by setup.py), made now (`read`) or on a copy thread of the
reader's own (`start`: the host reader's read-ahead, without a Python thread); without a
compiler, a numpy gather per shard and a reordering copy, made now. Anything else (compressed
vector stores, `gs://`) stays with tensorstore.

The checks tensorstore makes stay: the index checksum when a shard is opened, each chunk's
checksum the first time it is read in this process (the store is immutable once COMPLETE,
as tensorstore's cache assumes too), chunk sizes against the metadata, and a missing chunk
is an error, never zeros.
"""

import ctypes
import mmap
import os
import threading
import weakref
from typing import Optional

import google_crc32c
import numpy as np

from lumenvq import native

CRC_BYTES = 4
_MISSING = np.uint64(2**64 - 1)  # The index's (offset, nbytes) of a chunk never written.
# Shards mapped at once: each is one of the process's memory maps (Linux allows 65,530 by
# default, vm.max_map_count), and holds no file descriptor (`_map_file`). KILT's 22M
# passages at 4,096 a shard are 5,372 shards: a random read of them never reopens one.
MAX_OPEN_SHARDS = 16384
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_file(path: str) -> np.ndarray:
  """The whole file, read-only, as uint8 over a shared memory map that holds no descriptor.

  Why by hand (libc's mmap through ctypes): Python's `mmap.mmap` keeps a duplicate of the
  file's descriptor for each map (until 3.13's `trackfd=False`), so a reader of thousands of
  shards would hold thousands of descriptors, and under a 1,024 or 4,096 descriptor limit
  had to close and reopen shards at random reads: 256 open shards of 1,024 read 500x slower
  than a 16-shard store (benchmarks/corpus_scale.py). The map is unmapped when the last
  array over it is gone.
  """
  fd = os.open(path, os.O_RDONLY)
  try:
    size = os.fstat(fd).st_size
    if size == 0:
      raise ValueError("an empty file cannot be mapped")
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
      error = ctypes.get_errno()
      raise OSError(error, os.strerror(error))
  finally:
    os.close(fd)
  memory = (ctypes.c_uint8 * size).from_address(address)
  weakref.finalize(memory, _LIBC.munmap, address, size)
  data = np.frombuffer(memory, np.uint8)  # Holds `memory`, so the map, while it lives.
  data.flags.writeable = False
  return data


def _load_native() -> Optional[ctypes.CDLL]:
  """csrc/gather_rows.cc when setup.py built it, else None (numpy copies, synchronously)."""
  built = native.library(
      "memory._gather_rows",
      "host reads copy twice, through numpy, and read " "ahead through tensorstore",
  )
  if built is None:
    return None
  pointer, size = ctypes.c_void_p, ctypes.c_int64
  # worker (None: copy now), ids, n, num_rows, shard_rows, bases, verified, used, clock,
  # stride, row_bytes, out, ticket
  built.lumenvq_gather_rows.argtypes = [
      pointer,
      pointer,
      size,
      size,
      size,
      pointer,
      pointer,
      pointer,
      size,
      size,
      size,
      pointer,
      pointer,
  ]
  built.lumenvq_gather_rows.restype = size
  built.lumenvq_worker_new.restype = pointer
  built.lumenvq_worker_wait.argtypes = [pointer, size]
  built.lumenvq_worker_free.argtypes = [pointer]
  return built


_NATIVE = _load_native()


class ShardReadError(ValueError):
  """A shard file that is missing, truncated, corrupt, or lacks a requested row."""

  def __init__(self, shard: int, message: str):
    super().__init__(message)
    self.shard = shard


def _crc(data: np.ndarray) -> int:
  return google_crc32c.value(data)


class _Shard:
  """One shard file: its mapped bytes, its chunk index, and which chunks were verified."""

  def __init__(self, path: str, index: int, rows: int, chunk_bytes: int, verified: np.ndarray):
    """`verified`: the reader's flags of this shard's rows (it may hold fewer than `rows`)."""
    self.path, self.index, self.first_row = path, index, index * rows
    try:
      # A plain read-only ndarray over the map (np.memmap's subclass costs per index).
      self.data = _map_file(path)
    except (OSError, ValueError) as e:
      raise ShardReadError(index, f"shard file {path} cannot be mapped: {e}") from e
    index_bytes = rows * 16 + CRC_BYTES
    if self.data.size < index_bytes:
      raise ShardReadError(
          index,
          f"shard file {path}: {self.data.size} bytes, shorter than "
          f"its index of {rows} chunks ({index_bytes} bytes)",
      )
    raw_index = self.data[-index_bytes:-CRC_BYTES]
    if _crc(raw_index) != int(self.data[-CRC_BYTES:].view("<u4")[0]):
      raise ShardReadError(index, f"shard file {path}: its chunk index fails its crc32c check")
    table = raw_index.view("<u8").reshape(rows, 2)
    self.present = table[:, 0] != _MISSING
    self.offsets, nbytes = table[:, 0].astype(np.int64), table[:, 1]
    self.chunk_bytes, self.stride = chunk_bytes, chunk_bytes + CRC_BYTES
    bad = self.present & (
        (nbytes != self.stride)
        | (self.offsets < 0)
        | (self.offsets + self.stride > self.data.size - index_bytes)
    )
    if bad.any():
      i = int(np.argmax(bad))
      raise ShardReadError(
          index,
          f"shard file {path}: chunk {i} at byte {self.offsets[i]} "
          f"of {nbytes[i]} bytes does not fit the file or the row size "
          f"{chunk_bytes} + {CRC_BYTES}",
      )
    # tensorstore writes the chunks back to back in row order: then chunk i is row i of a
    # [-1, stride] view of the file, and a batch of chunks is one np.take.
    self.in_order = bool(
        np.array_equal(self.offsets[self.present], np.flatnonzero(self.present) * self.stride)
    )
    self.by_row = (
        self.data[: self.data.size // self.stride * self.stride].reshape(-1, self.stride)
        if self.in_order
        else None
    )
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
        out[j] = self.data[start : start + self.stride]

  def verify(self, inner: np.ndarray) -> None:
    """Presence and crc32c of the chunks `inner` not verified before."""
    if not self.unverified:
      return
    for i in inner[~self.verified[inner]]:
      if not self.present[i]:
        raise ShardReadError(
            self.index, f"shard file {self.path}: no chunk for row " f"{self.first_row + int(i)}"
        )
      start = self.offsets[i]
      stored = int(self.data[start + self.chunk_bytes : start + self.stride].view("<u4")[0])
      if _crc(self.data[start : start + self.chunk_bytes]) != stored:
        raise ShardReadError(
            self.index,
            f"shard file {self.path}: row "
            f"{self.first_row + int(i)} fails its crc32c check (corrupt)",
        )
      self.verified[i] = True
      self.unverified -= 1


class ShardRowReader:
  """Rows of one local zarr v3 array `[N, *row_shape]` of `dtype`, sharded along its first
  axis into `shard_rows` rows per file, one uncompressed inner chunk per row; shard `k`'s
  file is `shard_path(k)`."""

  def __init__(self, shard_path, num_rows: int, shard_rows: int, row_shape: tuple, dtype: np.dtype):
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
    # What the C gather reads and stamps, as addresses (the arrays are never reallocated).
    self._c_state = (self._bases.ctypes.data, self._verified.ctypes.data, self._used.ctypes.data)
    self._local = threading.local()
    self._worker, self._worker_pid, self._tickets = None, None, 0  # The copy thread (`start`).

  @classmethod
  def for_zarr_array(cls, directory: str, metadata: dict) -> Optional["ShardRowReader"]:
    """A reader for the array in local `directory` with zarr.json `metadata`, or None when
    its layout is not the one this reader knows (then read it with tensorstore)."""
    shape = metadata.get("shape", [])
    grid = metadata.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
    codecs = metadata.get("codecs", [])
    if (
        len(shape) < 2
        or len(grid) != len(shape)
        or list(grid[1:]) != list(shape[1:])
        or len(codecs) != 1
        or codecs[0].get("name") != "sharding_indexed"
        or metadata.get("chunk_key_encoding", {}).get("name") != "default"
    ):
      return None
    config = codecs[0].get("configuration", {})
    dtype = np.dtype(metadata.get("data_type", "V"))
    inner = [c.get("name") for c in config.get("codecs", [])]
    little = all(
        c.get("configuration", {}).get("endian", "little") == "little"
        for c in config.get("codecs", []) + config.get("index_codecs", [])
    )
    if (
        config.get("chunk_shape") != [1, *shape[1:]]
        or inner != ["bytes", "crc32c"]
        or [c.get("name") for c in config.get("index_codecs", [])] != ["bytes", "crc32c"]
        or config.get("index_location", "end") != "end"
        or not little
        or dtype.kind not in "uif"
    ):
      return None
    trailing = "/".join("0" for _ in shape[1:])
    return cls(
        lambda k: os.path.join(directory, "c", str(k), trailing),
        shape[0],
        grid[0],
        shape[1:],
        dtype,
    )

  def _shard(self, k: int) -> _Shard:
    """Shard k, opened if needed, evicting the least recently read one (under the lock)."""
    shard = self._open.get(k)
    if shard is None:
      rows = self._verified[k * self.shard_rows : (k + 1) * self.shard_rows]
      shard = _Shard(self.shard_path(k), k, self.shard_rows, self.chunk_bytes, rows)
      if len(self._open) >= MAX_OPEN_SHARDS:
        oldest = min(self._open, key=self._used.__getitem__)
        if self._worker_pid == os.getpid():  # Copies in flight may read it: let them end.
          _NATIVE.lumenvq_worker_wait(self._worker, self._tickets - 1)
        del self._open[oldest]
        self._bases[oldest] = 0
      self._open[k] = shard
      if shard.in_order:
        self._bases[k] = shard.base
    return shard

  def read(self, ids: np.ndarray) -> np.ndarray:
    """[len(ids), *row_shape] for row indices in [0, num_rows), in their order (repeats
    allowed)."""
    return self._begin(ids, ahead=False).result()

  @staticmethod
  def reads_ahead() -> bool:
    """Whether `start` copies on a thread of its own (the C gather is built)."""
    return _NATIVE is not None

  def start(self, ids: np.ndarray) -> "PendingRows":
    """`read(ids)` begun on the copy thread (`reads_ahead()`; else read now): the rows are
    located and checked here, errors raised here, and `result()` waits for the copy."""
    return self._begin(ids, ahead=True)

  def _begin(self, ids: np.ndarray, ahead: bool) -> "PendingRows":
    ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
    out = np.empty((ids.size, self.chunk_bytes), np.uint8)
    ticket = ctypes.c_int64()
    with self._lock:  # Also while copying now: no shard is unmapped under the copy.
      self._clock += 1
      worker = self._start_worker() if ahead and _NATIVE is not None else None
      if _NATIVE is None or not self._located(worker, ids, out, ticket):
        self._copy(ids, out)
      elif worker is not None:
        self._tickets += 1
        return PendingRows(self, out, worker, ticket.value)
    return PendingRows(self, out)

  def _start_worker(self) -> int:
    """This process's copy thread (a forked child has none of its parent's threads)."""
    if self._worker_pid != os.getpid():
      self._worker, self._worker_pid = _NATIVE.lumenvq_worker_new(), os.getpid()
      self._tickets = 0
      # Not at exit: a PendingRows may outlive the reader's finalizer there.
      weakref.finalize(self, _free_worker, self._worker, self._worker_pid).atexit = False
    return self._worker

  def _located(self, worker, ids: np.ndarray, out: np.ndarray, ticket) -> bool:
    """Whether the C gather took every row of `ids` (under the lock), copying them now or on
    `worker`: else the shards are opened and the rows verified, and it tries once more.
    False: a shard in another writer's chunk order, or more shards in the batch than stay
    open."""
    for attempt in range(2):
      if (
          _NATIVE.lumenvq_gather_rows(
              worker,
              ids.ctypes.data,
              ids.size,
              self.num_rows,
              self.shard_rows,
              *self._c_state,
              self._clock,
              self.chunk_bytes + CRC_BYTES,
              self.chunk_bytes,
              out.ctypes.data,
              ctypes.byref(ticket),
          )
          < 0
      ):
        return True
      if not attempt:
        self._prepare(ids)
    return False

  def _copy(self, ids: np.ndarray, out: np.ndarray) -> None:
    """Rows `ids` into `out` by numpy (under the lock): sorted by shard, copied, scattered
    into order."""
    self._check_range(ids)
    shards = ids // self.shard_rows
    self._used[shards] = self._clock
    order = np.argsort(ids, kind="stable")
    sorted_shards = shards[order]
    sorted_inner = ids[order] - sorted_shards * self.shard_rows
    scratch = self._scratch(ids.size)
    starts = [0, *(np.flatnonzero(np.diff(sorted_shards)) + 1).tolist()] if ids.size else []
    for lo, hi, k in zip(starts, starts[1:] + [ids.size], sorted_shards[starts].tolist()):
      self._shard(k).copy(sorted_inner[lo:hi], scratch[lo:hi])
    out[order] = scratch[:, : self.chunk_bytes]

  def _rows(self, out: np.ndarray) -> np.ndarray:
    return out.view(self.dtype).reshape(len(out), *self.row_shape)

  def _prepare(self, ids: np.ndarray) -> None:
    """Opens the shards of `ids` and verifies their rows (under the lock)."""
    self._check_range(ids)
    shards = ids // self.shard_rows
    self._used[shards] = self._clock  # Opening one evicts none of the others.
    for k in np.unique(shards).tolist():
      mine = ids[shards == k]
      self._shard(k).verify(mine - k * self.shard_rows)

  def _check_range(self, ids: np.ndarray) -> None:
    bad = ids[(ids < 0) | (ids >= self.num_rows)]
    if bad.size:
      raise IndexError(f"row {int(bad[0])} is out of range: the array has {self.num_rows} rows")

  def _scratch(self, n: int) -> np.ndarray:
    """uint8 [n, chunk + crc32c] reused by this thread's reads: a fresh buffer each read cost
    more in page faults than the copy (a 256 KB batch took 2x a numpy memmap read)."""
    buffer = getattr(self._local, "scratch", None)
    if buffer is None or len(buffer) < n:
      buffer = np.empty(
          (max(n, 2 * len(buffer) if buffer is not None else n), self.chunk_bytes + CRC_BYTES),
          np.uint8,
      )
      self._local.scratch = buffer
    return buffer[:n]


def _free_worker(worker: int, pid: int) -> None:
  if os.getpid() == pid:  # A forked child's copy of the handle names no thread.
    _NATIVE.lumenvq_worker_free(worker)  # Copies what it was given, then joins.


class PendingRows:
  """Rows the copy thread is writing into `out`; `result()` waits for them. Dropped before
  that, it still waits: the thread must not write into freed memory."""

  def __init__(self, reader: ShardRowReader, out: np.ndarray, worker=None, ticket: int = 0):
    self._reader, self._out, self._worker, self._ticket = reader, out, worker, ticket

  def result(self) -> np.ndarray:
    self._wait()
    return self._reader._rows(self._out)  # pylint: disable=protected-access

  def _wait(self) -> None:
    if self._worker is not None:
      _NATIVE.lumenvq_worker_wait(self._worker, self._ticket)
      self._worker = None

  __del__ = _wait
