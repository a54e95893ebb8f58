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
under `models.STEP_CONSTANTS`. As arguments they keep the shardings they were placed with
(the table over the whole mesh, the codebooks like the model's own), are never baked into a
compiled executable (a closed-over constant of gigabytes would be), and are not variables,
so no checkpoint saves them and no optimizer sees them.

This module is the model side: what runs inside the jitted steps. Opening the store and
feeding batches is `lumenvq.memory.memory_feed`.
"""

import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp

from lumenvq.memory import memory_table
from lumenvq.model import models, readers

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
      raise ValueError(
          f"MemorySource.reader={self.reader!r} reads a memory store: set "
          "MemorySource.path (made by `python -m lumenvq.precompute_memory`)"
      )

  @property
  def stored(self) -> bool:
    return self.reader != "compute"

  def check(self, reader_config) -> None:
    """A stored reader needs memory to store: fid has no memory encoder."""
    if self.stored and reader_config.architecture == "fid":
      raise ValueError(
          f"MemorySource.reader={self.reader!r} with ReaderConfig.architecture="
          "'fid': fid has no memory encoder, so there is no memory to store"
      )


def _memory(module, values, mask, codebooks) -> readers.Memory:
  if codebooks is None:  # Stored vectors are the memory itself.
    return readers.Memory(values, mask)
  return module.memory_from_codes(values, mask, codebooks)


def teacher_forced(
    module,
    question_tokens,
    values,
    mask,
    codebooks,
    decoder_input_tokens,
    decoder_target_tokens=None,
    *,
    enable_dropout: bool = False,
):
  """`Reader.from_memory` on stored rows (a flax `apply` method: `module` is bound)."""
  return module.from_memory(
      question_tokens,
      _memory(module, values, mask, codebooks),
      decoder_input_tokens,
      decoder_target_tokens,
      enable_dropout=enable_dropout,
  )


def encode(module, question_tokens, values, mask, codebooks):
  """`Reader.encode_memory` on stored rows: (encoded, mask) for decoding."""
  return module.encode_memory(question_tokens, _memory(module, values, mask, codebooks))


def _constants(batch, reader: str) -> dict:
  constants = batch.get(models.STEP_CONSTANTS)
  if constants is None:
    raise ValueError(
        f"MemorySource.reader={reader!r}: the batch has no "
        f"{models.STEP_CONSTANTS!r}; give the Trainer the step constants of "
        "memory_feed.open_feed"
    )
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
  return memory_table.gather_lengths(_constants(batch, reader)["table"], batch["passage_ids"]).sum()
