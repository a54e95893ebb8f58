"""The host memory reader: adds the stored memory of each batch's retrieved passages.

A batch with `passage_ids` [B, K] (-1 padded) gets `memory_values` [B, K, Lp, W] (codes
[B, K, Lp, R, G] with R > 1 residual stages) and `memory_mask` [B, K, Lp] from a
`memory_store.MemoryStore`, as numpy; the trainer places them like any other feature.

`wrap` keeps the reads of the next `read_ahead` batches in flight while the consumer works
on the current one, so storage latency hides behind the device step. The reads run on native
threads (`MemoryStore.start_read`: the store's copy thread, or tensorstore's), not on a
Python thread: a reader thread's hand-offs of the GIL to and from the consumer cost more than
reading a small batch (0.3 of a numpy memmap's rate for 64 passages of 4 KB). Errors reach
the consumer in stream order, after the batches before them.
"""

import collections
from typing import Iterable, Iterator

import numpy as np

from lumenvq.memory.memory_store import MemoryStore


class _Failure:
  """An error of the input stream or of starting a read, raised when its turn comes."""

  def __init__(self, error: Exception):
    self.error = error


class HostMemoryReader:
  """Reads memory rows for batches from `store`; `num_passages_per_example` is K."""

  def __init__(self, store: MemoryStore, num_passages_per_example: int, read_ahead: int = 2):
    if read_ahead < 0:
      raise ValueError(f"read_ahead={read_ahead}: must be >= 0 (0 reads synchronously)")
    self.store, self.num_passages, self.read_ahead = store, num_passages_per_example, read_ahead
    self._positions = np.arange(store.passage_length)

  def add_memory(self, batch: dict) -> dict:
    """The batch with memory_values and memory_mask added (read now)."""
    return self._with_memory(batch, *self.store.read(self._ids(batch)))

  def wrap(self, batches: Iterable[dict]) -> Iterator[dict]:
    """`add_memory` over a stream, `read_ahead` batches ahead, in order."""
    if self.read_ahead == 0:
      return map(self.add_memory, batches)
    return self._read_ahead(iter(batches))

  def _ids(self, batch: dict) -> np.ndarray:
    if "passage_ids" not in batch:
      raise ValueError(
          f"batch has no 'passage_ids' (features: {sorted(batch)}): the host "
          f"reader reads the memory of retrieved passages from {self.store.path}"
      )
    ids = np.asarray(batch["passage_ids"])
    if ids.ndim != 2 or ids.shape[1] != self.num_passages:
      raise ValueError(
          f"passage_ids of shape {ids.shape}: expected [B, K={self.num_passages}] "
          "(ReaderConfig.num_passages)"
      )
    return ids

  def _with_memory(self, batch: dict, values: np.ndarray, lengths: np.ndarray) -> dict:
    return {
        **batch,
        "memory_values": values,
        "memory_mask": self._positions < lengths[..., None],
    }  # MemoryStore.mask's rule.

  def _read_ahead(self, batches: Iterator[dict]) -> Iterator[dict]:
    in_flight = collections.deque()  # (batch, PendingRead) or a _Failure, in stream order.
    exhausted = False
    while True:
      while not exhausted and len(in_flight) <= self.read_ahead:
        try:
          batch = next(batches)
          in_flight.append((batch, self.store.start_read(self._ids(batch))))
        except StopIteration:
          exhausted = True
        except Exception as e:  # pylint: disable=broad-except  (raised in its turn)
          in_flight.append(_Failure(e))
          exhausted = True
      if not in_flight:
        return
      item = in_flight.popleft()
      if isinstance(item, _Failure):
        raise item.error
      batch, pending = item
      yield self._with_memory(batch, *pending.result())
