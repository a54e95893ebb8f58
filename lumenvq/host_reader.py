"""The host memory reader: adds the stored memory of each batch's retrieved passages.

A batch with `passage_ids` [B, K] (-1 padded) gets `memory_values` [B, K, Lp, W] (codes
[B, K, Lp, R, G] with R > 1 residual stages) and `memory_mask` [B, K, Lp] from a
`memory_store.MemoryStore`, as numpy; the trainer places them like any other feature.
`wrap` reads `read_ahead` batches ahead on a background thread, so storage latency hides
behind the device step: a bounded queue, errors re-raised in the consumer, and the thread
stopped when the consumer stops early.
"""
import queue
import threading
from typing import Iterable, Iterator

import numpy as np

from lumenvq.memory_store import MemoryStore

_END = object()
_POLL_SECONDS = 0.1  # How often a blocked reader thread checks whether to stop.


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class HostMemoryReader:
  """Reads memory rows for batches from `store`; `num_passages_per_example` is K."""

  def __init__(self, store: MemoryStore, num_passages_per_example: int, read_ahead: int = 2):
    if read_ahead < 0:
      raise ValueError(f"read_ahead={read_ahead}: must be >= 0 (0 reads synchronously)")
    self.store, self.num_passages, self.read_ahead = store, num_passages_per_example, read_ahead

  def add_memory(self, batch: dict) -> dict:
    """The batch with memory_values and memory_mask added (read now, on this thread)."""
    if "passage_ids" not in batch:
      raise ValueError(f"batch has no 'passage_ids' (features: {sorted(batch)}): the host "
                       f"reader reads the memory of retrieved passages from {self.store.path}")
    ids = np.asarray(batch["passage_ids"])
    if ids.ndim != 2 or ids.shape[1] != self.num_passages:
      raise ValueError(f"passage_ids of shape {ids.shape}: expected [B, K={self.num_passages}] "
                       "(ReaderConfig.num_passages)")
    values, lengths = self.store.read(ids)
    return {**batch, "memory_values": values,
            "memory_mask": MemoryStore.mask(lengths, self.store.passage_length)}

  def wrap(self, batches: Iterable[dict]) -> Iterator[dict]:
    """`add_memory` over a stream, `read_ahead` batches ahead, in order."""
    if self.read_ahead == 0:
      return map(self.add_memory, batches)
    return self._read_ahead(iter(batches))

  def _read_ahead(self, batches: Iterator[dict]) -> Iterator[dict]:
    ready = queue.Queue(maxsize=self.read_ahead)
    stop = threading.Event()

    def put(item) -> bool:
      while not stop.is_set():
        try:
          ready.put(item, timeout=_POLL_SECONDS)
          return True
        except queue.Full:
          continue
      return False

    def produce():
      try:
        for batch in batches:
          if not put(self.add_memory(batch)):
            return
        put(_END)
      except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
        put(_Failure(e))

    thread = threading.Thread(target=produce, name="HostMemoryReader", daemon=True)
    thread.start()
    try:
      while True:
        item = ready.get()
        if item is _END:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:  # Also when the consumer closes the generator early.
      stop.set()
      thread.join()
