"""How a run feeds a reader its stored memory (`stored_memory.MemorySource`, gin): the store
opened and checked, the step constants of its jitted steps (the device table, the codebooks),
and the host-side preparation of its batches (host reads with read-ahead).

A store is opened with the fingerprint the run expects (`store_fingerprint.fingerprint_for`);
fields the run does not know are left out of the comparison rather than guessed: the
vocabulary and passage table unless `MemorySource.vocabulary_path` / `passage_table_dir`
are set, and in training the checkpoint step unless `MemorySource.checkpoint_step` is
(eval and infer default to the step of the restored checkpoint). The model's own
dimensions, architecture, memory layers and quantizer shape are always compared.
"""

from typing import Iterator, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from lumenvq.memory import host_reader, memory_store, memory_table, store_fingerprint
from lumenvq.quant import quantizer


def expected_fingerprint(model, source, checkpoint_step: Optional[int]) -> dict:
  """`store_fingerprint.fingerprint_for` of what this run knows: the fields of what it does not
  know are None there and left out here (`MemoryStore.open` compares the fields given).
  None fields the model decides (lumen's quantizer) go too; its architecture still counts."""
  step = source.checkpoint_step if source.checkpoint_step is not None else checkpoint_step
  fingerprint = store_fingerprint.fingerprint_for(
      model, step, source.vocabulary_path, source.passage_table_dir
  )
  return {k: v for k, v in fingerprint.items() if v is not None}


def _codebooks(codebooks: np.ndarray, mesh, rules):
  """The store's codebooks on `mesh`, sharded like the model's own (the "codebook" rule)."""
  axes = quantizer.CODEBOOK_AXES[-codebooks.ndim :]
  sharding = nn.logical_to_mesh_sharding(P(*axes), mesh, rules)
  return jax.make_array_from_callback(codebooks.shape, sharding, lambda index: codebooks[index])


class MemoryFeed:
  """A run's stored memory: the open store, the step constants of its jitted steps, and
  the host-side preparation of its batches (`prepare` one batch, `wrap` a stream).
  For 'compute' there is nothing: no constants, batches pass unchanged."""

  def __init__(
      self,
      reader: str = "compute",
      store=None,
      step_constants=None,
      read_ahead: int = 2,
      num_passages: Optional[int] = None,
  ):
    self.reader, self.store, self.step_constants = reader, store, step_constants
    self._host = None
    if reader == "host":
      self._host = host_reader.HostMemoryReader(store, num_passages, read_ahead=read_ahead)

  def prepare(self, batch: dict) -> dict:
    """One converted (numpy, per-process) batch ready for `input_pipeline.to_global`."""
    if self.reader == "host":
      return self._host.add_memory(batch)
    if self.reader == "device":
      memory_table.check_ids(batch["passage_ids"], self.store.num_passages, self.store.path)
    return batch

  def wrap(self, batches: Iterator[dict]) -> Iterator[dict]:
    """A stream of batches, prepared; the host reader reads ahead (host_reader.py)."""
    if self.reader == "host":
      return self._host.wrap(batches)
    return map(self.prepare, batches)


def open_feed(model, mesh, rules, checkpoint_step: Optional[int] = None) -> MemoryFeed:
  """The feed of `model.memory` (any model: no MemorySource means 'compute') on `mesh`.

  `checkpoint_step`: the restored checkpoint's step (eval, infer), or None (training)."""
  source = getattr(model, "memory", None)
  if source is None or not source.stored:
    return MemoryFeed()
  store = memory_store.MemoryStore.open(
      source.path, expected_fingerprint=expected_fingerprint(model, source, checkpoint_step)
  )
  if store.positions != model.reader.stores_positions:
    have = "keeps" if store.positions else "has no"
    raise memory_store.StoreError(
        f"memory store {source.path} {have} token positions, but ReaderConfig.token_pruning="
        f"{model.reader.token_pruning}: a pruned reader reads a store of pruned memory (its "
        "tokens' positions beside their codes) and an unpruned one a store without"
    )
  constants = {}
  if store.codebooks is not None:
    constants["codebooks"] = _codebooks(store.codebooks, mesh, rules)
  if source.reader == "device":
    constants["table"] = memory_table.load(store, mesh, rules)
  return MemoryFeed(source.reader, store, constants, source.read_ahead, model.reader.num_passages)


def attach(trainer_, checkpoint_step: Optional[int] = None) -> MemoryFeed:
  """Opens the feed of `trainer_.model` on its mesh and gives the trainer its step
  constants; the CLIs' one call (train: `checkpoint_step` None; eval, infer: the step)."""
  feed = open_feed(trainer_.model, trainer_.mesh, trainer_.rules, checkpoint_step)
  trainer_.step_constants = feed.step_constants
  return feed
