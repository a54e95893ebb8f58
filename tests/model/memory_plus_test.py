"""memory+ in the T5 stack: off by default, the same on 1, 2 and 8 devices with the values
sharded, PQ values decoded per selected row, exported codes, and checkpoints."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import memory_plus, models, network
from lumenvq.model.memory_plus_config import MemoryPlusConfig
from lumenvq.model.network_config import T5Config
from lumenvq.quant import pq_codec
from lumenvq.training import checkpoints, optimizers, partitioning, trainer

RULES = partitioning.standard_logical_axis_rules()
BASE = dict(
    vocab_size=64,
    emb_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    dtype="float32",
)
PLUS = dict(encoder_layers=(1,), decoder_layers=(0,), n_keys=16, heads=2, knn=4, key_dim=8)


def _config(**plus):
  return T5Config(**BASE, memory_plus=MemoryPlusConfig(**{**PLUS, **plus}))


def _tokens(seed=0, shape=(8, 6)):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 64, size=shape), jnp.int32)


def _names(variables):
  return sorted(flax.traverse_util.flatten_dict(nn.unbox(variables), sep="/"))


def test_no_memory_plus_layers_is_todays_network():
  tokens = _tokens()
  plain = network.init_variables(T5Config(**BASE), jax.random.PRNGKey(0))
  empty_cfg = T5Config(**BASE, memory_plus=MemoryPlusConfig())
  empty = network.init_variables(empty_cfg, jax.random.PRNGKey(0))
  assert _names(plain) == _names(empty)
  np.testing.assert_array_equal(
      network.Transformer(T5Config(**BASE)).apply(plain, tokens, tokens, tokens),
      network.Transformer(empty_cfg).apply(empty, tokens, tokens, tokens),
  )


def test_layers_outside_the_stack_are_named():
  with pytest.raises(ValueError, match="decoder_layers"):
    _config(decoder_layers=(2,))
  with pytest.raises(ValueError, match="value_storage"):
    MemoryPlusConfig(value_storage="int4")


def test_shared_pool_is_one_table_and_per_layer_pools_are_one_each():
  shared = _names(network.init_variables(_config(), jax.random.PRNGKey(0))["params"])
  own = _names(network.init_variables(_config(shared_values=False), jax.random.PRNGKey(0)))
  assert [n for n in shared if n.endswith("values")] == ["memory_plus_values/values"]
  assert [n for n in own if n.endswith("values")] == [
      "params/decoder/layers_0/memory_plus/memory_plus_values/values",
      "params/encoder/layers_1/memory_plus/memory_plus_values/values",
  ]
  assert not any("layers_1/mlp" in n for n in shared if n.startswith("encoder"))
  beside = _names(network.init_variables(_config(replace_mlp=False), jax.random.PRNGKey(0)))
  assert "params/encoder/layers_1/mlp/wo/kernel" in beside


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 2), (2, 4)])
def test_same_loss_and_gradients_on_1_2_and_8_devices(mesh_shape):
  one_layer = {**BASE, "num_encoder_layers": 1, "num_decoder_layers": 1}
  cfg = T5Config(**one_layer, memory_plus=MemoryPlusConfig(**{**PLUS, "encoder_layers": (0,)}))
  tokens = _tokens()
  params = nn.unbox(network.init_variables(cfg, jax.random.PRNGKey(0))["params"])
  module = network.Transformer(cfg)

  def loss(p):
    logits = module.apply({"params": p}, tokens, tokens, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params)
  n = mesh_shape[0] * mesh_shape[1]
  mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:n])
  abstract = network.abstract_params(cfg)
  shardings = partitioning.logical_shardings(abstract, mesh, RULES)
  values_sharding = shardings["memory_plus_values"]["values"]
  with partitioning.axis_rules_and_mesh(mesh, RULES):
    sharded = jax.device_put(params, shardings)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))(
        sharded
    )
  if n > 1:
    assert len(sharded["memory_plus_values"]["values"].sharding.device_set) == n
  assert values_sharding.spec == jax.sharding.PartitionSpec("data", "model")
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _pool_inputs(seed=0):
  rng = np.random.default_rng(seed)
  indices = jnp.asarray(rng.integers(0, 256, size=(5, 8)), jnp.int32)
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(5, 8)), jnp.float32))
  return indices, weights


def test_pq_codes_decode_of_selected_rows_equals_decoding_the_table_then_gathering():
  cfg = MemoryPlusConfig(
      n_keys=16, knn=4, value_storage="pq_codes", pq_subspaces=4, pq_codebook_size=16
  )
  pool = memory_plus.ValuePool(cfg, 32)
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(0, 16, size=(256, 4)), jnp.uint8)
  codebooks = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)
  indices, weights = _pool_inputs()
  variables = {memory_plus.CODES_COLLECTION: {"codes": codes, "codebooks": codebooks}}
  got = pool.apply(variables, indices, weights, deterministic=True)
  table = pq_codec.decode(codes, codebooks)  # the whole table, then gather
  want = jnp.einsum("tk,tkd->td", weights, table[indices])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pq_train_then_export_reads_the_same_values_from_codes_alone():
  plus = dict(value_storage="pq_train", pq_subspaces=4, pq_codebook_size=16)
  model = models.EncoderDecoderModel(_config(**plus))
  variables = model.get_initial_variables(jax.random.PRNGKey(0))
  params = nn.unbox(variables["params"])
  state = {k: nn.unbox(v) for k, v in variables.items() if k != "params"}
  batch = {
      "encoder_input_tokens": _tokens(1, (2, 4)),
      "decoder_input_tokens": _tokens(2, (2, 4)),
      "decoder_target_tokens": _tokens(3, (2, 4)),
      "decoder_loss_weights": jnp.ones((2, 4)),
  }
  # One train step seeds the value codebooks (k-means++ on the selected rows) and the
  # gradient reaches the float table straight through the quantizer.
  grads, (_, state) = jax.jit(jax.grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(4), state
  )
  assert bool(state["quantizer"]["memory_plus_values"]["value_quantizer"]["initialized"])
  assert float(jnp.abs(grads["memory_plus_values"]["values"]).sum()) > 0
  want = jax.jit(model.eval_fn)(params, batch, state)
  code_params, code_state = memory_plus.export_pq_values(params, state)
  assert "memory_plus_values" not in code_params
  codes = code_state[memory_plus.CODES_COLLECTION]["memory_plus_values"]["codes"]
  assert codes.shape == (256, 4) and codes.dtype == jnp.uint8
  code_model = models.EncoderDecoderModel(_config(**{**plus, "value_storage": "pq_codes"}))
  assert _names(code_model.abstract_params()) == _names(code_params)
  got = jax.jit(code_model.eval_fn)(code_params, batch, code_state)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="no trained codebooks"):
    memory_plus.export_pq_values(params, {})


def test_memory_plus_train_state_saves_and_restores_onto_another_mesh(tmp_path):
  groups = {"memory_plus_values/": optimizers.adamw(1e-3, weight_decay=0.0)}
  opt = optimizers.make_optimizer(param_groups=groups)
  model = models.EncoderDecoderModel(_config())
  state = trainer.Trainer(model, opt, partitioning.make_mesh((8, 1)), RULES).init_state()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, keep=1)
  ckpt.save(1, state)
  ckpt.wait()
  ckpt.close()
  other = trainer.Trainer(model, opt, partitioning.make_mesh((2, 4)), RULES)
  restored = checkpoints.Checkpointer(str(tmp_path)).restore(other.abstract_state())
  for a, b in zip(
      jax.tree_util.tree_leaves(jax.device_get((state.params, state.opt_state))),
      jax.tree_util.tree_leaves(jax.device_get((restored.params, restored.opt_state))),
  ):
    np.testing.assert_array_equal(a, b)
  values = restored.params["memory_plus_values"]["values"]
  assert values.sharding.spec == jax.sharding.PartitionSpec("data", "model")
