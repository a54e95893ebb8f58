"""ReaderModel: FiD, LUMEN, LUMEN-VQ and LUMEN-Light (`readers`) behind the trainer's model
interface (`models.EncoderDecoderModel`), with the feature converter for retrieved passages.

The loss, metrics, eval and decoding are the T5 model's; only the network's inputs differ
(question and passages instead of one encoder sequence). LUMEN-VQ's codebooks are model
state: a train step makes the "quantizer" collection mutable and gives it a "quantizer"
PRNG stream, so the EMA codebooks move; eval and predict leave it immutable. The
quantizer's codebook usage, perplexity and relative reconstruction error become training
metrics. Models do not import data code: the converter takes numpy examples.

`ReaderModel.memory` (a `stored_memory.MemorySource`, gin) chooses where memory comes from:
computed from passage tokens, or read from a precomputed store (batches then carry
passage ids, or the host-read rows, instead of passage tokens; see `stored_memory`).
"""

from typing import Optional, Sequence

import gin
import jax.numpy as jnp
import numpy as np

from lumenvq.model import models, readers, stored_memory, token_pruning
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig

# Scalar quantizer metrics logged in training (the sown dict also has per-subspace arrays).
QUANTIZER_METRICS = (
    "codebook_usage",
    "perplexity",
    "relative_reconstruction_error",
    "num_reset_codes",  # Dead codes moved onto batch vectors this step.
)


class ReaderFeatureConverter:
  """numpy examples -> reader batches.

  `inputs` -> question_tokens [B, Lq]; `targets` -> decoder_input_tokens,
  decoder_target_tokens, decoder_loss_weights (as `models.EncDecFeatureConverter`);
  `passage_tokens` (K' token arrays, a ragged list or a [K', L] array, best ranked first)
  -> passage_tokens [B, K, Lp]: the first K passages, each cut to Lp tokens, missing ones
  all zero (readers treat an all-padding passage as absent). A `None` example is an empty
  padding row. With `passage_ids` (stored memory) `passage_ids` ([K'] ids, -1 padded) ->
  passage_ids [B, K] int32, the first K, -1 for missing ones, instead of passage_tokens.
  """

  FEATURES = (
      "question_tokens",
      "passage_tokens",
      "decoder_input_tokens",
      "decoder_target_tokens",
      "decoder_loss_weights",
  )
  ID_FEATURES = (
      "question_tokens",
      "passage_ids",
      "decoder_input_tokens",
      "decoder_target_tokens",
      "decoder_loss_weights",
  )

  def __init__(
      self,
      task_feature_lengths: dict,
      num_passages: int,
      passage_length: int,
      passage_ids: bool = False,
  ):
    self.base = models.EncDecFeatureConverter(task_feature_lengths)
    self.num_passages, self.passage_length = num_passages, passage_length
    self.passage_ids = passage_ids

  def _passages(self, examples) -> np.ndarray:
    k, lp = self.num_passages, self.passage_length
    out = np.zeros((len(examples), k, lp), np.int32)
    for row, ex in enumerate(examples):
      if ex is None:
        continue
      if "passage_tokens" not in ex:
        raise ValueError(
            f"example {row} of the batch has no 'passage_tokens' feature "
            f"(features: {sorted(ex)}): reader models read retrieved passages"
        )
      for slot, passage in enumerate(list(ex["passage_tokens"])[:k]):
        ids = np.asarray(passage)
        if ids.ndim != 1:
          raise ValueError(
              f"passage {slot} of example {row} has shape {ids.shape}: "
              "'passage_tokens' must be a list of 1-D token arrays or [K, L]"
          )
        ids = ids[:lp]
        out[row, slot, : len(ids)] = ids
    return out

  def _ids(self, examples) -> np.ndarray:
    out = np.full((len(examples), self.num_passages), -1, np.int32)
    for row, ex in enumerate(examples):
      if ex is None:
        continue
      if "passage_ids" not in ex:
        raise ValueError(
            f"example {row} of the batch has no 'passage_ids' feature "
            f"(features: {sorted(ex)}): stored memory is read by passage id"
        )
      ids = np.asarray(ex["passage_ids"])
      if ids.ndim != 1:
        raise ValueError(f"'passage_ids' of example {row} has shape {ids.shape}: expected [K]")
      ids = ids[: self.num_passages]
      out[row, : len(ids)] = ids
    return out

  @property
  def reads_passage_texts(self) -> bool:
    """Whether examples need passage texts and tokens (not with passage ids: the input
    pipeline then builds examples without them, `seqio_tasks.without_passage_texts`)."""
    return not self.passage_ids

  def __call__(self, examples: Sequence[Optional[dict]]) -> dict:
    batch = self.base(examples)
    batch["question_tokens"] = batch.pop("encoder_input_tokens")
    if self.passage_ids:
      batch["passage_ids"] = self._ids(examples)
    else:
      batch["passage_tokens"] = self._passages(examples)
    return batch


@gin.configurable
class ReaderModel(models.EncoderDecoderModel):
  """A reader (`ReaderConfig.architecture`) trained with the T5 model's loss and decoding.

  `label_smoothing`, `z_loss` and `decode_fn` pass through `**kwargs` to
  `EncoderDecoderModel`, so gin's `EncoderDecoderModel.*` bindings of the run files
  apply to readers too (`ReaderModel.*` ones override them). `memory`: where the memory
  comes from (None: computed from passage tokens).
  """

  def __init__(
      self,
      config: Optional[T5Config] = None,
      reader: Optional[ReaderConfig] = None,
      memory: Optional[stored_memory.MemorySource] = None,
      **kwargs,
  ):
    self.reader = reader if reader is not None else ReaderConfig()
    self.memory = memory if memory is not None else stored_memory.MemorySource()
    self.memory.check(self.reader)
    super().__init__(config, **kwargs)

  @property
  def module_method(self):
    return stored_memory.teacher_forced if self.memory.stored else None

  def make_module(self):
    return readers.make_reader(self.config, self.reader)

  def feature_converter(self, task_feature_lengths: dict):
    return ReaderFeatureConverter(
        task_feature_lengths,
        self.reader.num_passages,
        self.reader.passage_length,
        passage_ids=self.memory.stored,
    )

  def get_initial_variables(
      self, rng, batch_size: int = 1, question_length: int = 8, decoder_length: int = 8
  ):
    return readers.init_variables(self.module, rng, batch_size, question_length, decoder_length)

  def frozen_param_patterns(self) -> tuple:
    """The memory encoder's layers when `ReaderConfig.freeze_memory_encoder`."""
    return self.module.frozen_param_patterns()

  def module_inputs(self, batch) -> tuple:
    memory = (
        (batch["passage_tokens"],)
        if not self.memory.stored
        else stored_memory.memory_inputs(batch, self.memory.reader)
    )
    return (
        batch["question_tokens"],
        *memory,
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
    )

  def input_token_count(self, batch):
    memory = (
        jnp.sum(batch["passage_tokens"] > 0)
        if not self.memory.stored
        else stored_memory.memory_token_count(batch, self.memory.reader)
    )
    return jnp.sum(batch["question_tokens"] > 0) + memory

  def encode(self, variables, batch) -> tuple:
    if self.memory.stored:
      return self.module.apply(
          variables,
          batch["question_tokens"],
          *stored_memory.memory_inputs(batch, self.memory.reader),
          method=stored_memory.encode,
      )
    return self.module.apply(
        variables,
        batch["question_tokens"],
        batch["passage_tokens"],
        method=readers.Reader.encode_passages,
    )

  def auxiliary_loss(self, intermediates, weight) -> tuple:
    """The T5 model's terms and the vq_lm importance head's cross-entropy."""
    loss, metrics = super().auxiliary_loss(intermediates, weight)
    pruning = self.reader.token_pruning
    if pruning is None:
      return loss, metrics
    head, head_metrics = token_pruning.loss_terms(intermediates, weight, pruning.head_loss_weight)
    if head is None:
      return loss, metrics
    return (head if loss is None else loss + head), {**metrics, **head_metrics}

  def intermediate_metrics(self, intermediates, weight) -> dict:
    """`quantizer/<metric>` x the loss weight: the trainer sums metrics over microbatches
    and the logger divides by the total weight, which gives a weighted mean."""
    sown = intermediates.get("quantizer_metrics")
    if not sown:
      return {}
    (metrics,) = sown  # One quantizer call per forward.
    return {f"quantizer/{name}": metrics[name] * weight for name in QUANTIZER_METRICS}
