"""Models: loss, teacher-forced metrics and prediction around the network (T5X's
`BaseModel` shape), each with the feature converter that makes its batches.

`EncoderDecoderModel` is plain T5; `reader_models.ReaderModel` (FiD, LUMEN,
LUMEN-VQ, LUMEN-Light) subclasses it with its own converter and network
inputs; the trainer only uses this interface. Models do not import data code:
converters take numpy examples (`{"inputs": ids, "targets": ids}`) from
whatever pipeline made them.
"""

import inspect
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from lumenvq.model import decoding, losses, network, vq_attention
from lumenvq.model.network_config import T5Config
from lumenvq.quant import quantizer

# The batch key under which a model finds the trainer's step constants (trainer.py).
STEP_CONSTANTS = "step_constants"

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

  FEATURES = (
      "encoder_input_tokens",
      "decoder_input_tokens",
      "decoder_target_tokens",
      "decoder_loss_weights",
  )

  def __init__(self, task_feature_lengths: dict):
    self.lengths = {
        "inputs": task_feature_lengths["inputs"],
        "targets": task_feature_lengths["targets"],
    }

  def _pad(self, examples, feature):
    length = self.lengths[feature]
    out = np.zeros((len(examples), length), np.int32)
    for row, ex in enumerate(examples):
      if ex is None:
        continue
      ids = np.asarray(ex[feature])
      if len(ids) > length:
        raise ValueError(
            f"feature {feature!r} of length {len(ids)} is longer than "
            f"TASK_FEATURE_LENGTHS[{feature!r}]={length}"
        )
      out[row, : len(ids)] = ids
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

  The trainer's interface: `feature_converter`, `get_initial_variables`,
  `abstract_variables`, `model_state_collections`, `frozen_param_patterns`, `loss_fn`,
  `eval_fn`, `predict_batch`. *Model state* is every variable collection besides
  "params" (LUMEN-VQ's "quantizer" codebooks; none for T5): it travels in the train state
  and its checkpoints, train steps return its new value, eval and predict only read it,
  and the optimizer never sees it. Subclasses change the network's inputs through
  `make_module`, `module_inputs` (with `module_method`), `encode`, `input_token_count`,
  `train_rngs` and `intermediate_metrics`.
  """

  FEATURE_CONVERTER_CLS = EncDecFeatureConverter
  # What the teacher-forced forward applies to `module_inputs` (flax `apply`'s `method`;
  # None: the module's `__call__`).
  module_method: Optional[Callable] = None

  def __init__(
      self,
      config: Optional[T5Config] = None,
      label_smoothing: float = 0.0,
      z_loss: float = 1e-4,
      decode_fn: Callable = decoding.greedy_decode,
  ):
    self.config = config if config is not None else T5Config()
    self.module = self.make_module()
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.decode_fn = decode_fn
    self._decode_takes_rng = "rng" in inspect.signature(decode_fn).parameters
    self._decode_takes_state = "model_state" in inspect.signature(decode_fn).parameters
    self._abstract_variables = None

  def make_module(self):
    return network.Transformer(self.config)

  def feature_converter(self, task_feature_lengths: dict):
    return self.FEATURE_CONVERTER_CLS(task_feature_lengths)

  def get_initial_variables(
      self, rng, batch_size: int = 1, encoder_length: int = 8, decoder_length: int = 8
  ):
    """Variables boxed with logical axis names; shapes depend on the config only."""
    return network.init_variables(self.config, rng, batch_size, encoder_length, decoder_length)

  def abstract_variables(self):
    """ShapeDtypeStructs (boxed with logical axes) of every collection, without allocating."""
    if self._abstract_variables is None:
      self._abstract_variables = jax.eval_shape(
          lambda: self.get_initial_variables(jax.random.PRNGKey(0))
      )
    return self._abstract_variables

  def abstract_params(self):
    return self.abstract_variables()["params"]

  def model_state_collections(self) -> tuple:
    """The variable collections that form the model state (see the class docstring)."""
    return tuple(sorted(k for k in self.abstract_variables() if k != "params"))

  def frozen_param_patterns(self) -> tuple:
    """Parameter regexes the trainer freezes on top of the optimizer's own."""
    return ()

  def module_inputs(self, batch) -> tuple:
    """Positional arguments of the module's teacher-forced `__call__`."""
    return (
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
    )

  def input_token_count(self, batch):
    """Non-padding input tokens (for tokens/s)."""
    return jnp.sum(batch["encoder_input_tokens"] > 0)

  def encode(self, variables, batch) -> tuple:
    """(encoded, encoder mask) the decoder reads when predicting."""
    tokens = batch["encoder_input_tokens"]
    return self.module.apply(variables, tokens, method=network.Transformer.encode), tokens > 0

  def train_rngs(self, rng) -> dict:
    """PRNG streams of a train step, drawn from the trainer's per-(step, microbatch) key; EMA
    codebooks (LUMEN-VQ's, VQ attention's, memory+ PQ values') also get the "quantizer" stream."""
    rngs = {"dropout": rng}
    if quantizer.QUANTIZER_COLLECTION in self.model_state_collections():
      rngs[quantizer.RNG_STREAM] = jax.random.fold_in(rng, 1)
    return rngs

  def intermediate_metrics(self, intermediates, weight) -> dict:
    """Training metric sums from what the module sowed; none for T5."""
    del intermediates, weight
    return {}

  def _model_state(self, model_state) -> dict:
    model_state = {} if model_state is None else dict(model_state)
    missing = [c for c in self.model_state_collections() if c not in model_state]
    if missing:
      raise ValueError(
          f"{type(self).__name__} needs the model state collections {missing} "
          f"(the train state's model_state); got {sorted(model_state)}"
      )
    return model_state

  def _logits(self, params, batch, dropout_rng, model_state):
    """(logits, new model state, intermediates). Without `dropout_rng` (eval) nothing is
    mutable; a train step makes the model state and "intermediates" mutable."""
    variables = {"params": params, **model_state}
    args = self.module_inputs(batch)
    if dropout_rng is None:
      return (
          self.module.apply(variables, *args, method=self.module_method, enable_dropout=False),
          model_state,
          {},
      )
    mutable = list(model_state) + ["intermediates"]
    logits, updated = self.module.apply(
        variables,
        *args,
        method=self.module_method,
        enable_dropout=True,
        rngs=self.train_rngs(dropout_rng),
        mutable=mutable,
    )
    new_state = {k: updated.get(k, v) for k, v in model_state.items()}
    return logits, new_state, updated.get("intermediates", {})

  def loss_fn(self, params, batch, dropout_rng, model_state=None):
    """(sum of token losses, (metric sums, new model state)).

    Training (dropout, model-state updates) when `dropout_rng` is given. Sums, not means:
    the trainer divides by the batch's total loss weight, so a loss normalised per target
    token stays exact under gradient accumulation; metrics a model adds are sums over
    target tokens too (the logger divides them by the weight).
    """
    model_state = self._model_state(model_state)
    logits, new_state, intermediates = self._logits(params, batch, dropout_rng, model_state)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    loss, z_loss, weight = losses.cross_entropy_with_logits(
        logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss
    )
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    metrics = {
        "loss": loss,
        "z_loss": z_loss,
        "weight": weight,
        "correct": correct,
        "tokens": weight + self.input_token_count(batch),
    }
    metrics.update(self.intermediate_metrics(intermediates, weight))
    extra, extra_metrics = self.auxiliary_loss(intermediates, weight)
    if extra is not None:
      loss = loss + extra
      metrics.update(extra_metrics)
    return loss, (metrics, new_state)

  def auxiliary_loss(self, intermediates, weight) -> tuple:
    """(loss term or None, metric sums) from what the module sowed, x the loss weight: VQ
    attention's commitment loss, which trains with the tokens' loss."""
    return vq_attention.training_terms(intermediates, weight)

  def eval_fn(self, params, batch, model_state=None):
    """Teacher-forced metric sums without dropout; the model state is only read."""
    return self.loss_fn(params, batch, None, model_state)[1][0]

  def predict_batch(self, params, batch, rng=None, model_state=None):
    """Decoded target ids [b, targets length] from `decode_fn`.

    A sampling decode_fn gets `rng` (default PRNGKey(0): reproducible); a beam
    search returning (tokens [b, beams, l], scores) gives its best beam.
    """
    variables = {"params": params, **self._model_state(model_state)}
    encoded, mask = self.encode(variables, batch)
    kwargs = (
        {"rng": rng if rng is not None else jax.random.PRNGKey(0)} if self._decode_takes_rng else {}
    )
    state = {k: v for k, v in variables.items() if k != "params"}
    if state and self._decode_takes_state:  # e.g. VQ attention's codebooks in the decoder
      kwargs["model_state"] = state
    tokens = self.decode_fn(
        self.module, params, encoded, mask, batch["decoder_target_tokens"].shape[1], **kwargs
    )
    if isinstance(tokens, tuple):  # Beam search: (tokens, scores), best beam first.
      tokens = tokens[0][:, 0]
    return tokens
