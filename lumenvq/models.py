"""Models: loss, teacher-forced metrics and prediction around the network (T5X's
`BaseModel` shape), each with the feature converter that makes its batches.

`EncoderDecoderModel` is plain T5. FiD / LUMEN / LUMEN-VQ are meant as
siblings: they subclass it, add features (`passage_ids`, ...) to their
converter and override `loss_fn` / `predict_batch`; the trainer only uses
this interface. Models do not import data code: converters take numpy
examples (`{"inputs": ids, "targets": ids}`) from whatever pipeline made them.
"""
import inspect
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from lumenvq import decoding, losses, network
from lumenvq.network_config import T5Config

gin.external_configurable(decoding.greedy_decode, module="decoding")
for _name in ("sample_decode", "beam_search"):  # As the decoding module grows them.
  if hasattr(decoding, _name):
    gin.external_configurable(getattr(decoding, _name), module="decoding")


class EncDecFeatureConverter:
  """numpy twin of `seqio.EncDecFeatureConverter(pack=False)`.

  inputs -> encoder_input_tokens; targets -> decoder_target_tokens, their
  right shift (starting from 0) -> decoder_input_tokens, and
  decoder_loss_weights = targets != 0. A `None` example is an empty padding row.
  """
  FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights")

  def __init__(self, task_feature_lengths: dict):
    self.lengths = {"inputs": task_feature_lengths["inputs"],
                    "targets": task_feature_lengths["targets"]}

  def _pad(self, examples, feature):
    length = self.lengths[feature]
    out = np.zeros((len(examples), length), np.int32)
    for row, ex in enumerate(examples):
      if ex is None:
        continue
      ids = np.asarray(ex[feature])
      if len(ids) > length:
        raise ValueError(f"feature {feature!r} of length {len(ids)} is longer than "
                         f"TASK_FEATURE_LENGTHS[{feature!r}]={length}")
      out[row, :len(ids)] = ids
    return out

  def __call__(self, examples: Sequence[Optional[dict]]) -> dict:
    targets = self._pad(examples, "targets")
    return {
        "encoder_input_tokens": self._pad(examples, "inputs"),
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets != 0).astype(np.float32),
    }


@gin.configurable
class EncoderDecoderModel:
  """T5 1.1 encoder-decoder trained with token cross-entropy (T5X's EncoderDecoderModel).

  `label_smoothing` and `z_loss` follow T5X (z_loss 1e-4 by default).
  `decode_fn(module, params, encoded, encoder_mask, max_length[, rng])` is
  bound in gin (`EncoderDecoderModel.decode_fn = @decoding.greedy_decode`).
  """
  FEATURE_CONVERTER_CLS = EncDecFeatureConverter

  def __init__(self, config: Optional[T5Config] = None, label_smoothing: float = 0.0,
               z_loss: float = 1e-4, decode_fn: Callable = decoding.greedy_decode):
    self.config = config if config is not None else T5Config()
    self.module = network.Transformer(self.config)
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.decode_fn = decode_fn
    self._decode_takes_rng = "rng" in inspect.signature(decode_fn).parameters

  def feature_converter(self, task_feature_lengths: dict):
    return self.FEATURE_CONVERTER_CLS(task_feature_lengths)

  def get_initial_variables(self, rng, batch_size: int = 1, encoder_length: int = 8,
                            decoder_length: int = 8):
    """Variables boxed with logical axis names; shapes depend on the config only."""
    return network.init_variables(self.config, rng, batch_size, encoder_length,
                                  decoder_length)

  def abstract_params(self):
    return network.abstract_params(self.config)

  def _logits(self, params, batch, dropout_rng):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], enable_dropout=dropout_rng is not None, rngs=rngs)

  def loss_fn(self, params, batch, dropout_rng):
    """(sum of token losses, metric sums). Dropout is on when `dropout_rng` is given.

    Sums, not means: the trainer divides by the batch's total loss weight, so
    a loss normalised per target token stays exact under gradient accumulation.
    """
    logits = self._logits(params, batch, dropout_rng)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    loss, z_loss, weight = losses.cross_entropy_with_logits(
        logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    return loss, {"loss": loss, "z_loss": z_loss, "weight": weight, "correct": correct,
                  "tokens": weight + jnp.sum(batch["encoder_input_tokens"] > 0)}

  def eval_fn(self, params, batch):
    """Teacher-forced metric sums without dropout."""
    return self.loss_fn(params, batch, None)[1]

  def predict_batch(self, params, batch, rng=None):
    """Decoded target ids [b, targets length] from `decode_fn`.

    A sampling decode_fn gets `rng` (default PRNGKey(0): reproducible); a beam
    search returning (tokens [b, beams, l], scores) gives its best beam.
    """
    encoder_tokens = batch["encoder_input_tokens"]
    encoded = self.module.apply({"params": params}, encoder_tokens,
                                method=network.Transformer.encode)
    kwargs = {"rng": rng if rng is not None else jax.random.PRNGKey(0)} \
        if self._decode_takes_rng else {}
    tokens = self.decode_fn(self.module, params, encoded, encoder_tokens > 0,
                            batch["decoder_target_tokens"].shape[1], **kwargs)
    if isinstance(tokens, tuple):  # Beam search: (tokens, scores), best beam first.
      tokens = tokens[0][:, 0]
    return tokens
