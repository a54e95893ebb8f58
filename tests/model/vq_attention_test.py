"""VQ attention: exact against dense attention when keys are codewords; decoding; meshes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import network, vq_attention
from lumenvq.model.network_config import T5Config
from lumenvq.model.vq_attention import VQAttentionConfig

H, D, S = 3, 4, 16
CONFIG = T5Config(
    vocab_size=40,
    emb_dim=16,
    num_heads=H,
    head_dim=D,
    mlp_dim=32,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=6,
    dtype="float32",
)


def _inputs(seed, b, l, mask_from=None):
  rs = np.random.RandomState(seed)
  codebook = rs.randn(H, S, D).astype(np.float32)
  codes = rs.randint(0, S, (b, l, H))
  keys = codebook[np.arange(H), codes]  # [b, l, h, d]: every key is a codeword
  q = rs.randn(b, l, H, D).astype(np.float32)
  v = rs.randn(b, l, H, D).astype(np.float32)
  mask = np.ones((b, l), bool)
  if mask_from is not None:
    for row, start in enumerate(mask_from):
      mask[row, start:] = False
  return [jnp.asarray(a) for a in (q, keys, v, codes, codebook, mask)]


class _Bias(nn.Module):
  """Dense [b, h, l, l] and VQ block biases from one RelativePositionBiases."""

  bidirectional: bool
  block_length: int

  @nn.compact
  def __call__(self, positions, mask):
    relpos = network.RelativePositionBiases(CONFIG, self.bidirectional)
    vq = VQAttentionConfig(block_length=self.block_length)
    blocks = vq_attention.block_bias(relpos, positions, mask, vq, bidirectional=self.bidirectional)
    pos = jnp.arange(mask.shape[1])[None] if positions is None else positions
    allowed = mask[:, None, None, :]
    if not self.bidirectional:
      allowed = allowed & (pos[:, None, :, None] >= pos[:, None, None, :])
    return relpos(pos, pos), allowed, blocks


def _dense(q, k, v, bias, allowed):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
  s = jnp.where(allowed, s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "length,block,mask_from,positions",
    [(24, 6, None, False), (23, 8, (23, 9), False), (7, 6, None, False), (40, 6, (31, 2), True)],
)
def test_equals_dense_attention_when_keys_are_codewords(
    bidirectional, length, block, mask_from, positions
):
  b = 2
  q, k, v, codes, codebook, mask = _inputs(length + block, b, length, mask_from)
  pos = None
  if positions:  # A reader-like gap: every row's positions jump by 2 once.
    pos = jnp.broadcast_to(jnp.arange(length) + 2 * (jnp.arange(length) >= 5), (b, length))
  bias_mod = _Bias(bidirectional, block)
  params = bias_mod.init(jax.random.PRNGKey(1), pos, mask)
  dense_bias, allowed, blocks = bias_mod.apply(params, pos, mask)
  got = vq_attention.block_attention(q, k, v, codes, blocks, codebook, lambda w, _: w)
  want = _dense(q, k, v, dense_bias, allowed)
  valid = np.asarray(mask)  # padded query rows are arbitrary in both
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=2e-5, atol=2e-5)


VQ_CONFIG = dataclasses.replace(
    CONFIG,
    encoder_attention="vq",
    decoder_self_attention="vq",
    vq_attention=VQAttentionConfig(num_codes=S, block_length=6),
)


def _tokens(seed, b, l, lengths=None):
  out = np.random.RandomState(seed).randint(2, CONFIG.vocab_size, (b, l))
  for row, n in enumerate(lengths or ()):
    out[row, n:] = 0
  return jnp.asarray(out, jnp.int32)


def _seeded(model, enc, dec):
  """Variables after one train-mode forward: the codebooks seeded from these keys."""
  variables = model.init(jax.random.PRNGKey(0), enc, dec, dec)
  _, state = model.apply(
      variables,
      enc,
      dec,
      dec,
      enable_dropout=True,
      mutable=["quantizer", "intermediates"],
      rngs={"quantizer": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)},
  )
  return {"params": variables["params"], "quantizer": state["quantizer"]}, state


def test_defaults_are_dense_and_vq_adds_only_codebooks():
  dense = network.Transformer(CONFIG).init(jax.random.PRNGKey(0), *[_tokens(0, 1, 8)] * 3)
  vq = network.Transformer(VQ_CONFIG).init(jax.random.PRNGKey(0), *[_tokens(0, 1, 8)] * 3)
  assert set(dense) == {"params"} and set(vq) == {"params", "quantizer"}
  same = jax.tree.map(lambda a, b: a.shape == b.shape, dense["params"], vq["params"])
  assert all(jax.tree.leaves(same))  # Same parameter names and shapes
  cb = nn.unbox(vq["quantizer"]["encoder"]["layers_0"]["attention"]["vq"]["key_quantizer"])
  assert cb["codebooks"].shape == (1, H, S, D)
  assert set(vq["quantizer"]["decoder"]["layers_0"]) == {"self_attention"}


def test_config_errors_name_the_setting():
  with pytest.raises(ValueError, match="T5Config.encoder_attention='sparse'"):
    T5Config(encoder_attention="sparse")
  with pytest.raises(ValueError, match="block_length=4 < T5Config.relative_attention_max_distance"):
    dataclasses.replace(VQ_CONFIG, vq_attention=VQAttentionConfig(block_length=4))
  with pytest.raises(ValueError, match="VQAttentionConfig.num_codes must be positive"):
    VQAttentionConfig(num_codes=0)


def test_train_forward_updates_codebooks_and_sows_commitment():
  model = network.Transformer(VQ_CONFIG)
  enc, dec = _tokens(1, 2, 20, (20, 13)), _tokens(2, 2, 15, (15, 9))
  variables, state = _seeded(model, enc, dec)
  q = state["quantizer"]["encoder"]["layers_1"]["attention"]["vq"]["key_quantizer"]
  assert bool(q["initialized"]) and np.any(np.asarray(q["codebooks"]) != 0)
  loss, metrics = vq_attention.training_terms(state["intermediates"], 10.0)
  per_layer = 10.0 * VQ_CONFIG.vq_attention.commitment_weight
  assert float(loss) > 0 and float(loss) < 4 * per_layer * 100  # 4 vq layers
  assert 0 < float(metrics["vq_attention/codebook_usage"]) <= 10.0
  assert vq_attention.training_terms({}, 1.0) == (None, {})


def test_incremental_decoding_equals_the_full_forward():
  model = network.Transformer(VQ_CONFIG)
  enc, dec = _tokens(3, 2, 11, (11, 7)), _tokens(4, 2, 17)  # 17 steps: 3 blocks of 6
  variables, _ = _seeded(model, enc, dec)
  encoded = model.apply(variables, enc, method=network.Transformer.encode)
  full = model.apply(variables, encoded, enc > 0, dec, method=network.Transformer.decode)
  _, cache = model.apply(
      variables,
      encoded,
      enc > 0,
      jnp.zeros_like(dec),
      decode=True,
      method=network.Transformer.decode,
      mutable=["cache"],
  )
  cache = cache["cache"]
  window = cache["decoder"]["layers_0"]["self_attention"]["vq"]["keys"]
  assert window.shape == (2, 12, H, D)  # two blocks, whatever the length
  step = jax.jit(
      lambda c, t: model.apply(
          {**variables, "cache": c},
          encoded,
          enc > 0,
          t[:, None],
          decode=True,
          method=network.Transformer.decode,
          mutable=["cache"],
      )
  )
  for i in range(dec.shape[1]):
    logits, c = step(cache, dec[:, i])
    cache = c["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=2e-5, atol=2e-5)
