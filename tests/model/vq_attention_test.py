"""VQ attention: exact against dense attention when keys are codewords; decoding; meshes."""

import dataclasses
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.data import copy_task, passage_copy_task
from lumenvq.model import decoding, models, network, reader_models, vq_attention
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.model.vq_attention import VQAttentionConfig
from lumenvq.training import input_pipeline, optimizers, partitioning, trainer

H, D, S = 4, 4, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # Compilation is most of the time.
RULES = partitioning.standard_logical_axis_rules()
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
  got = jax.jit(
      lambda *a: vq_attention.block_attention(*a[:4], blocks, a[4], lambda w, _: w),
      compiler_options=FAST_COMPILE,
  )(q, k, v, codes, codebook)
  want = _dense(q, k, v, dense_bias, allowed)
  valid = np.asarray(mask)  # padded query rows are arbitrary in both
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length,block,mask_from", [(24, 6, None), (23, 8, (23, 9))])
def test_far_key_gradient_equals_dense_gradient(bidirectional, length, block, mask_from):
  """With far_key_gradient the summarised keys get dense attention's gradient; without it
  they get none from the summary, so the key gradients differ."""
  b = 2
  q, k, v, codes, codebook, mask = _inputs(length + block, b, length, mask_from)
  bias_mod = _Bias(bidirectional, block)
  dense_bias, allowed, blocks = bias_mod.apply(
      bias_mod.init(jax.random.PRNGKey(1), None, mask), None, mask
  )
  w = jnp.asarray(np.random.RandomState(3).randn(*q.shape), jnp.float32) * mask[:, :, None, None]
  vq = lambda kg: lambda q, k, v: jnp.sum(
      w * vq_attention.block_attention(q, k, v, codes, blocks, codebook, lambda x, _: x, kg)
  )
  dense = lambda q, k, v: jnp.sum(w * _dense(q, k, v, dense_bias, allowed))
  grads = lambda f: jax.jit(jax.grad(f, (0, 1, 2)), compiler_options=FAST_COMPILE)(q, k, v)
  want = grads(dense)
  for got, wanted in zip(grads(vq(True)), want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(wanted), rtol=1e-4, atol=1e-5)
  without = grads(vq(False))
  assert np.max(np.abs(np.asarray(without[1]) - np.asarray(want[1]))) > 0.1


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


def test_far_key_gradient_keeps_the_outputs_and_moves_the_key_gradient():
  enc, dec = _tokens(5, 2, 20, (20, 13)), _tokens(6, 2, 19)  # 19 steps: 4 blocks of 6
  variables, _ = _seeded(network.Transformer(VQ_CONFIG), enc, dec)

  def run(far_key_gradient):
    vq = dataclasses.replace(VQ_CONFIG.vq_attention, far_key_gradient=far_key_gradient)
    model = network.Transformer(dataclasses.replace(VQ_CONFIG, vq_attention=vq))
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, enc, dec, dec) ** 2)
    return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(variables["params"])

  (plain, plain_grads), (far, far_grads) = run(False), run(True)
  np.testing.assert_allclose(float(far), float(plain), rtol=1e-6)
  # The last layer's value gradient does not depend on the key gradient; its key's does
  # (the layers below get both through their outputs).
  last = lambda g, name: np.asarray(
      nn.unbox(g["decoder"]["layers_1"]["self_attention"][name]["kernel"])
  )
  assert not np.allclose(last(far_grads, "key"), last(plain_grads, "key"), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(
      last(far_grads, "value"), last(plain_grads, "value"), rtol=1e-4, atol=1e-5
  )


def test_incremental_decoding_equals_the_full_forward():
  model = network.Transformer(VQ_CONFIG)
  enc, dec = _tokens(3, 2, 11, (11, 7)), _tokens(4, 2, 17)  # 17 steps: 3 blocks of 6
  variables, _ = _seeded(model, enc, dec)
  encoded = model.apply(variables, enc, method=network.Transformer.encode)
  full = model.apply(variables, encoded, enc > 0, dec, method=network.Transformer.decode)
  state = {"quantizer": variables["quantizer"]}  # What predict_batch hands decode_fn.
  cache = decoding.init_cache(model, variables["params"], encoded, enc > 0, 17, state)
  window = cache["decoder"]["layers_0"]["self_attention"]["vq"]["keys"]
  assert window.shape == (2, 12, H, D)  # two blocks, whatever the length
  step = jax.jit(
      decoding._step_fn(model, variables["params"], encoded, enc > 0, state),
      compiler_options=FAST_COMPILE,
  )
  for i in range(dec.shape[1]):
    logits, cache = step(cache, dec[:, i])
    np.testing.assert_allclose(logits, full[:, i], rtol=2e-5, atol=2e-5)


def _train(model, mesh_shape, batches, steps=2):
  opt = optimizers.make_optimizer(schedule=optimizers.constant_schedule(0.01))
  mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[: np.prod(mesh_shape)])
  t = trainer.Trainer(model, opt, mesh, RULES, compiler_options=FAST_COMPILE)
  state, metrics = t.init_state(), []
  for i in range(steps):
    state, m = t.train_step(state, batches(model, mesh, i))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _copy_batches(model, mesh, index, lengths={"inputs": 14, "targets": 14}):
  source = copy_task.CopySource("lumenvq_debug_reverse", lengths)
  layout = input_pipeline.data_layout(mesh, 8)
  stream = input_pipeline.train_batches(source, model.feature_converter(lengths), layout, index)
  return input_pipeline.to_global(next(stream), mesh, 8)


def test_trainer_carries_codebooks_and_one_device_equals_eight():
  """EMA codebooks travel as model state; heads (and codes) sharded over `model` change
  nothing: (1, 1) vs a (2, 4) (data, model) mesh."""
  model = models.EncoderDecoderModel(dataclasses.replace(VQ_CONFIG, vocab_size=264))
  one, m1 = _train(model, (1, 1), _copy_batches)
  eight, m8 = _train(model, (2, 4), _copy_batches)
  for a, b in zip(m1, m8):
    assert a["finite"] and a["vq_attention/commitment_loss"] > 0
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        a["vq_attention/commitment_loss"], b["vq_attention/commitment_loss"], rtol=1e-4
    )
  cb = lambda s: s.model_state["quantizer"]["encoder"]["layers_0"]["attention"]["vq"]
  np.testing.assert_allclose(
      cb(one)["key_quantizer"]["codebooks"], cb(eight)["key_quantizer"]["codebooks"], atol=1e-4
  )
  assert bool(cb(one)["key_quantizer"]["initialized"])


def test_lumen_reader_with_vq_encoder_trains(arch="lumen"):
  """LUMEN's memory and live encoders (over `[question ; memory]` positions) in vq."""
  lengths = {"inputs": 8, "targets": 8}
  config = dataclasses.replace(VQ_CONFIG, vocab_size=264, decoder_self_attention="dense")
  reader = ReaderConfig(architecture=arch, num_passages=2, passage_length=8)
  model = reader_models.ReaderModel(config, reader)

  def batches(model, mesh, index):
    source = passage_copy_task.PassageCopySource("lumenvq_debug_passage_copy", lengths)
    layout = input_pipeline.data_layout(mesh, 4)
    stream = input_pipeline.train_batches(source, model.feature_converter(lengths), layout, index)
    return input_pipeline.to_global(next(stream), mesh, 4)

  state, metrics = _train(model, (1, 1), batches, steps=1)
  assert metrics[0]["finite"] and metrics[0]["vq_attention/commitment_loss"] > 0
  layers = state.model_state["quantizer"]["encoder"]
  assert sorted(layers) == ["layers_0", "layers_1"]
  assert bool(layers["layers_1"]["attention"]["vq"]["key_quantizer"]["initialized"])


def test_gin_files_set_vq_in_both_stacks():
  repo = os.path.join(os.path.dirname(__file__), "..", "..")
  try:
    gin.clear_config()
    gin.add_config_file_search_path(repo)
    with gin.unlock_config():
      for name in ("models/tiny.gin", "architectures/vq_attention.gin"):
        gin.parse_config_file(os.path.join(repo, "gin_configs", name))
      config = T5Config()
    assert (config.encoder_attention, config.decoder_self_attention) == ("vq", "vq")
    assert config.vq_attention == VQAttentionConfig(512, 512, 1e-4, 0.99, 0.01)
  finally:
    gin.clear_config()
