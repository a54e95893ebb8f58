"""Where a reader's memory comes from, chosen in gin (`ReaderModel.memory = @MemorySource()`,
see gin_configs/runs/stored_memory.gin), and how a run feeds it:

  'compute'  passage tokens through the memory encoder inside every step (the default);
  'host'     rows of a precomputed store read on the host (`host_reader.HostMemoryReader`,
             with read-ahead in training): batches carry memory_values [B, K, Lp, W] and
             memory_mask [B, K, Lp], placed with the batch sharding; codes are dequantized
             inside the jitted step;
  'device'   the store resident on device (`memory_table`): batches carry only
             passage_ids [B, K]; the step gathers the rows and dequantizes them.

Either stored reader ends in the reader's own `from_memory` (teacher forcing) and
`encode_memory` (predict) through `teacher_forced` / `encode` below, so the reader's math
exists once. LUMEN-VQ codes are dequantized with the codebooks stored beside them (the
codes' meaning), by `LumenVQ.memory_from_codes`: the same codes and codebooks as computing
memory on the fly give the same memory.

The device table and the store's codebooks are *step constants* (`trainer.Trainer`): an
argument of every jitted train / eval / predict step that the model finds in its batch
under `trainer.STEP_CONSTANTS`. As arguments they keep the shardings they were placed with
(the table over the whole mesh, the codebooks like the model's own), are never baked into a
compiled executable (a closed-over constant of gigabytes would be), and are not variables,
so no checkpoint saves them and no optimizer sees them.

A store is opened with the fingerprint the run expects (`store_fingerprint.fingerprint_for`);
fields the run does not know are left out of the comparison rather than guessed: the
vocabulary and passage table unless `MemorySource.vocabulary_path` / `passage_table_dir`
are set, and in training the checkpoint step unless `MemorySource.checkpoint_step` is
(eval and infer default to the step of the restored checkpoint). The model's own
dimensions, architecture, memory layers and quantizer shape are always compared.
"""
import dataclasses
from typing import Iterator, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lumenvq import memory_table, quantizer, readers, trainer
# The run side below imports the store modules where it opens a store: they read the
# passage table (`lumenvq.data`), and models, which import this module, never import data.

READERS = ("compute", "host", "device")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemorySource:
  """Where the reader's memory comes from (see the module docstring).

  Attributes:
    reader: 'compute', 'host' or 'device'.
    path: the store (`python -m lumenvq.precompute_memory`), for 'host' and 'device'.
    checkpoint_step: the step the store was computed from; None: eval and infer expect the
      restored checkpoint's step, training does not compare it.
    vocabulary_path, passage_table_dir: compared with the store's hashes when given.
    read_ahead: batches the host reader reads ahead in training.
  """
  reader: str = "compute"
  path: Optional[str] = None
  checkpoint_step: Optional[int] = None
  vocabulary_path: Optional[str] = None
  passage_table_dir: Optional[str] = None
  read_ahead: int = 2

  def __post_init__(self):
    if self.reader not in READERS:
      raise ValueError(f"MemorySource.reader={self.reader!r}: expected one of {READERS}")
    if self.stored and not self.path:
      raise ValueError(f"MemorySource.reader={self.reader!r} reads a memory store: set "
                       "MemorySource.path (made by `python -m lumenvq.precompute_memory`)")

  @property
  def stored(self) -> bool:
    return self.reader != "compute"

  def check(self, reader_config) -> None:
    """A stored reader needs memory to store: fid has no memory encoder."""
    if self.stored and reader_config.architecture == "fid":
      raise ValueError(f"MemorySource.reader={self.reader!r} with ReaderConfig.architecture="
                       "'fid': fid has no memory encoder, so there is no memory to store")


# Model side: what runs inside the jitted steps.

def _memory(module, values, mask, codebooks) -> readers.Memory:
  if codebooks is None:  # Stored vectors are the memory itself.
    return readers.Memory(values, mask)
  return module.memory_from_codes(values, mask, codebooks)


def teacher_forced(module, question_tokens, values, mask, codebooks, decoder_input_tokens,
                   decoder_target_tokens=None, *, enable_dropout: bool = False):
  """`Reader.from_memory` on stored rows (a flax `apply` method: `module` is bound)."""
  return module.from_memory(question_tokens, _memory(module, values, mask, codebooks),
                            decoder_input_tokens, decoder_target_tokens,
                            enable_dropout=enable_dropout)


def encode(module, question_tokens, values, mask, codebooks):
  """`Reader.encode_memory` on stored rows: (encoded, mask) for decoding."""
  return module.encode_memory(question_tokens, _memory(module, values, mask, codebooks))


def _constants(batch, reader: str) -> dict:
  constants = batch.get(trainer.STEP_CONSTANTS)
  if constants is None:
    raise ValueError(f"MemorySource.reader={reader!r}: the batch has no "
                     f"{trainer.STEP_CONSTANTS!r}; give the Trainer the step constants of "
                     "stored_memory.open_feed")
  return constants


def memory_inputs(batch, reader: str) -> tuple:
  """(values, mask, codebooks or None) of a batch's stored memory, inside jit."""
  constants = _constants(batch, reader)
  if reader == "host":
    values, mask = batch["memory_values"], batch["memory_mask"]
  else:
    values, lengths = memory_table.gather(constants["table"], batch["passage_ids"])
    mask = memory_table.length_mask(lengths, values.shape[2])
  return values, mask.astype(bool), constants.get("codebooks")


def memory_token_count(batch, reader: str):
  """Real memory tokens of a batch's stored memory (for tokens/s)."""
  if reader == "host":
    return jnp.sum(batch["memory_mask"], dtype=jnp.int32)
  return memory_table.gather_lengths(_constants(batch, reader)["table"],
                                     batch["passage_ids"]).sum()


# Run side: opening the store and feeding batches.

def expected_fingerprint(model, source: MemorySource, checkpoint_step: Optional[int]) -> dict:
  """`store_fingerprint.fingerprint_for` of what this run knows: the fields of what it does not
  know are None there and left out here (`MemoryStore.open` compares the fields given).
  None fields the model decides (lumen's quantizer) go too; its architecture still counts."""
  from lumenvq import store_fingerprint  # pylint: disable=g-import-not-at-top  (see the imports)
  step = source.checkpoint_step if source.checkpoint_step is not None else checkpoint_step
  fingerprint = store_fingerprint.fingerprint_for(model, step, source.vocabulary_path,
                                                  source.passage_table_dir)
  return {k: v for k, v in fingerprint.items() if v is not None}


def _codebooks(codebooks: np.ndarray, mesh, rules):
  """The store's codebooks on `mesh`, sharded like the model's own (the "codebook" rule)."""
  axes = quantizer.CODEBOOK_AXES[-codebooks.ndim:]
  sharding = nn.logical_to_mesh_sharding(P(*axes), mesh, rules)
  return jax.make_array_from_callback(codebooks.shape, sharding, lambda index: codebooks[index])


class MemoryFeed:
  """A run's stored memory: the open store, the step constants of its jitted steps, and
  the host-side preparation of its batches (`prepare` one batch, `wrap` a stream).
  For 'compute' there is nothing: no constants, batches pass unchanged."""

  def __init__(self, reader: str = "compute", store=None, step_constants=None,
               read_ahead: int = 2, num_passages: Optional[int] = None):
    self.reader, self.store, self.step_constants = reader, store, step_constants
    self._host = None
    if reader == "host":
      from lumenvq import host_reader  # pylint: disable=g-import-not-at-top  (see the imports)
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
  from lumenvq import memory_store  # pylint: disable=g-import-not-at-top  (see the imports)
  store = memory_store.MemoryStore.open(
      source.path, expected_fingerprint=expected_fingerprint(model, source, checkpoint_step))
  constants = {}
  if store.codebooks is not None:
    constants["codebooks"] = _codebooks(store.codebooks, mesh, rules)
  if source.reader == "device":
    constants["table"] = memory_table.load(store, mesh, rules)
  return MemoryFeed(source.reader, store, constants, source.read_ahead,
                    model.reader.num_passages)


def attach(trainer_, checkpoint_step: Optional[int] = None) -> MemoryFeed:
  """Opens the feed of `trainer_.model` on its mesh and gives the trainer its step
  constants; the CLIs' one call (train: `checkpoint_step` None; eval, infer: the step)."""
  feed = open_feed(trainer_.model, trainer_.mesh, trainer_.rules, checkpoint_step)
  trainer_.step_constants = feed.step_constants
  return feed
