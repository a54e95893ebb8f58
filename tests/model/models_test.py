"""EncoderDecoderModel: the feature converter, the per-token loss and prediction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import decoding, losses, models
from lumenvq.model.network_config import T5Config

CONFIG = T5Config(
    vocab_size=64,
    emb_dim=32,
    num_heads=2,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
LENGTHS = {"inputs": 6, "targets": 5}


def _batch():
  examples = [
      {"inputs": [5, 6, 7, 1], "targets": [9, 8, 1]},
      {"inputs": [4, 1], "targets": [3, 3, 3, 3, 1]},
      None,
  ]
  return models.EncDecFeatureConverter(LENGTHS)(examples)


def test_converter_pads_and_shifts_targets_right():
  batch = _batch()
  np.testing.assert_array_equal(
      batch["encoder_input_tokens"], [[5, 6, 7, 1, 0, 0], [4, 1, 0, 0, 0, 0], [0] * 6]
  )
  np.testing.assert_array_equal(
      batch["decoder_target_tokens"], [[9, 8, 1, 0, 0], [3, 3, 3, 3, 1], [0] * 5]
  )
  np.testing.assert_array_equal(
      batch["decoder_input_tokens"], [[0, 9, 8, 1, 0], [0, 3, 3, 3, 3], [0] * 5]
  )
  np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 0, 0], [1] * 5, [0] * 5])


def test_converter_rejects_overlong_features():
  with pytest.raises(ValueError, match=r"'targets' of length 6 .*\['targets'\]=5"):
    models.EncDecFeatureConverter(LENGTHS)([{"inputs": [1], "targets": [2] * 6}])


@jax.jit
def _loss_and_reference(batch):
  model = models.EncoderDecoderModel(CONFIG, label_smoothing=0.1, z_loss=1e-3)
  params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0))["params"])
  loss, (sums, _) = model.loss_fn(params, batch, None)
  logits = model.module.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      batch["decoder_target_tokens"],
  )
  ref = losses.cross_entropy_with_logits(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      label_smoothing=0.1,
      z_loss=1e-3,
  )
  return loss, sums, logits, ref


def test_loss_is_summed_per_target_token_with_smoothing_and_z_loss():
  batch = _batch()
  loss, sums, logits, (ref, ref_z, weight) = _loss_and_reference(batch)
  assert float(sums["weight"]) == 8.0 == float(weight)
  np.testing.assert_allclose([loss, sums["z_loss"]], [ref, ref_z], rtol=1e-6)
  correct = np.sum(
      (np.argmax(logits, -1) == batch["decoder_target_tokens"]) * batch["decoder_loss_weights"]
  )
  assert float(sums["correct"]) == correct
  assert float(sums["tokens"]) == 8 + 6  # Non-padding target and input tokens.


def test_predict_batch_calls_decode_fn_with_encoding_length_and_rng():
  seen = {}

  def sampler(module, params, encoded, mask, max_length, rng):
    seen.update(encoded=encoded.shape, mask=mask, max_length=max_length, rng=rng)
    return jnp.zeros((encoded.shape[0], max_length), jnp.int32)

  model = models.EncoderDecoderModel(CONFIG, decode_fn=sampler)
  params = nn.meta.unbox(model.abstract_params())
  batch = _batch()
  rng = jax.random.PRNGKey(7)
  out = jax.eval_shape(model.predict_batch, params, batch, rng)
  assert out.shape == (3, 5) and seen["max_length"] == 5
  assert seen["encoded"] == (3, 6, CONFIG.emb_dim)
  assert seen["rng"].shape == rng.shape
  # Greedy decoding takes no rng; the default model uses it.
  assert models.EncoderDecoderModel(CONFIG).decode_fn is decoding.greedy_decode

  def beams(module, params, encoded, mask, max_length):
    tokens = jnp.arange(3 * 2 * max_length, dtype=jnp.int32).reshape(3, 2, max_length)
    return tokens, jnp.zeros((3, 2))

  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  best = jax.jit(models.EncoderDecoderModel(CONFIG, decode_fn=beams).predict_batch)(zeros, batch)
  np.testing.assert_array_equal(best, np.arange(30).reshape(3, 2, 5)[:, 0])
