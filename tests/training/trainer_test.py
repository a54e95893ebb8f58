"""Trainer: the sharded train step agrees across meshes and microbatching, keeps
frozen parameters, computes in bf16 on fp32 parameters, and draws dropout from
(seed, step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lumenvq.data import copy_task
from lumenvq.model import models
from lumenvq.model.network_config import T5Config
from lumenvq.training import input_pipeline, optimizers, partitioning, trainer

RULES = partitioning.standard_logical_axis_rules()
LENGTHS = {"inputs": 8, "targets": 8}


def _config(**overrides):
  base = dict(
      vocab_size=264,
      emb_dim=32,
      num_heads=2,
      head_dim=8,
      mlp_dim=64,
      num_encoder_layers=1,
      num_decoder_layers=1,
      dropout_rate=0.0,
      dtype="float32",
  )
  return T5Config(**{**base, **overrides})


def _batches(model, mesh, steps, batch_size=8):
  source = copy_task.CopySource("lumenvq_debug_reverse", LENGTHS)
  layout = input_pipeline.data_layout(mesh, batch_size)
  stream = input_pipeline.train_batches(source, model.feature_converter(LENGTHS), layout, 0)
  return [input_pipeline.to_global(next(stream), mesh, batch_size) for _ in range(steps)]


def _run(t, model, steps=2):
  state = t.init_state()
  losses = []
  for batch in _batches(model, t.mesh, steps):
    state, metrics = t.train_step(state, batch)
    losses.append(float(metrics["loss"] / metrics["weight"]))
    assert bool(metrics["finite"])
  return state, losses


def test_meshes_and_microbatches_agree_and_frozen_params_stay():
  model = models.EncoderDecoderModel(_config())
  opt = optimizers.make_optimizer(
      schedule=optimizers.constant_schedule(0.05), frozen_patterns=(r"^encoder/layers_0/mlp/",)
  )
  one = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  ref_state, ref_losses = _run(trainer.Trainer(model, opt, one, RULES), model)
  t = trainer.Trainer(model, opt, partitioning.make_mesh((4, 2)), RULES, num_microbatches=2)
  state, losses = _run(t, model)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Adafactor normalises each update, so float32 reduction-order noise shows at ~1e-5.
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5),
      jax.device_get(state.params),
      jax.device_get(ref_state.params),
  )
  assert int(state.step) == 2
  kernel = state.params["decoder"]["logits_dense"]["kernel"]
  assert kernel.sharding.spec == P(None, "model")
  # The frozen MLP kept its initial values; its neighbours moved.
  init = jax.device_get(t.init_state().params["encoder"]["layers_0"])
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      jax.device_get(state.params["encoder"]["layers_0"]["mlp"]),
      init["mlp"],
  )
  assert not np.allclose(
      state.params["encoder"]["layers_0"]["attention"]["query"]["kernel"],
      init["attention"]["query"]["kernel"],
  )


def test_bf16_compute_fp32_params_and_dropout_from_seed_and_step():
  model = models.EncoderDecoderModel(_config(dtype="bfloat16", dropout_rate=0.3))
  opt = optimizers.make_optimizer(schedule=optimizers.constant_schedule(0.01))
  t = trainer.Trainer(model, opt, partitioning.make_mesh((2, 1), devices=jax.devices()[:2]), RULES)
  batch = _batches(model, t.mesh, 1)[0]
  jaxpr = str(
      jax.make_jaxpr(model.loss_fn)(
          jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t.abstract_params),
          batch,
          jax.random.PRNGKey(0),
      )
  )
  assert "bf16[" in jaxpr and "dot_general" in jaxpr
  state, losses = _run(t, model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.params))
  assert _run(t, model)[1] == losses  # A rerun draws the same dropout masks.
  # Same parameters and batch at another step number: other masks, another loss.
  _, at_0 = t.train_step(t.init_state(), batch)
  step_7 = jax.device_put(jnp.asarray(7, jnp.int32), t.replicated)
  _, at_7 = t.train_step(t.init_state().replace(step=step_7), batch)
  np.testing.assert_allclose(float(at_0["loss"] / at_0["weight"]), losses[0], rtol=1e-6)
  assert float(at_7["loss"]) != float(at_0["loss"])


def test_optimizer_state_is_sharded_like_its_parameter():
  mesh = partitioning.make_mesh((4, 2))
  params = {
      "mlp": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32)},
      "norm": {"scale": jax.ShapeDtypeStruct((256,), jnp.float32)},
  }
  shardings = {
      "mlp": {"kernel": NamedSharding(mesh, P(None, "model"))},
      "norm": {"scale": NamedSharding(mesh, P())},
  }
  opt_state = jax.eval_shape(optax.adafactor(0.1).init, params)
  specs = trainer.opt_state_shardings(opt_state, params, shardings, mesh)
  factored = specs[0]
  assert factored.v_row["mlp"]["kernel"].spec == P(None)  # [256]: the row statistics.
  assert factored.v_col["mlp"]["kernel"].spec == P("model")  # [512]: sharded like columns.
  assert factored.v["norm"]["scale"].spec == P(None)
  assert factored.count.spec == P()
  adam = jax.eval_shape(optax.adam(0.1).init, params)
  adam_specs = trainer.opt_state_shardings(adam, params, shardings, mesh)
  assert adam_specs[0].mu["mlp"]["kernel"].spec == P(None, "model")
