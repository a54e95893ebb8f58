"""Optimizers: T5X's rsqrt schedule and Adafactor defaults, AdamW, global clipping,
and freezing parameters by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lumenvq.training import optimizers


def _params():
  return {
      "encoder": {"layers_0": {"kernel": jnp.ones((256, 384))}},
      "decoder": {
          "layers_0": {"kernel": jnp.full((256, 384), 2.0)},
          "norm": {"scale": jnp.ones((8,))},
      },
  }


def _grads(params):
  return jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.5), params)


def test_rsqrt_decay_is_flat_during_warmup_then_inverse_sqrt():
  schedule = optimizers.rsqrt_decay(base_learning_rate=1.0, warmup_steps=10_000)
  np.testing.assert_allclose(
      [schedule(0), schedule(9_999), schedule(10_000), schedule(40_000)],
      [0.01, 0.01, 0.01, 0.005],
      rtol=1e-6,
  )


def test_adafactor_defaults_factor_large_matrices():
  opt = optimizers.make_optimizer()
  state = opt.tx.init(_params())
  factored = next(
      s
      for s in jax.tree_util.tree_leaves(
          state, is_leaf=lambda s: isinstance(s, optax.FactoredState)
      )
      if isinstance(s, optax.FactoredState)
  )
  kernel_rows = factored.v_row["encoder"]["layers_0"]["kernel"]
  kernel_cols = factored.v_col["encoder"]["layers_0"]["kernel"]
  assert {kernel_rows.shape, kernel_cols.shape} == {(256,), (384,)}
  # Vectors are not factored: a full second moment.
  assert factored.v["decoder"]["norm"]["scale"].shape == (8,)
  np.testing.assert_allclose(opt.schedule(0), 0.01)


def test_frozen_parameters_get_no_update_and_no_state():
  params = _params()
  opt = optimizers.make_optimizer(
      schedule=optimizers.constant_schedule(0.1), frozen_patterns=(r"^encoder/",)
  )
  state = opt.tx.init(params)
  updates, _ = opt.tx.update(_grads(params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(
      new["encoder"]["layers_0"]["kernel"], params["encoder"]["layers_0"]["kernel"]
  )
  assert not np.allclose(
      new["decoder"]["layers_0"]["kernel"], params["decoder"]["layers_0"]["kernel"]
  )
  stored = [leaf.shape for leaf in jax.tree_util.tree_leaves(state)]
  assert sum(s in ((256,), (384,)) for s in stored) == 2  # Only the decoder kernel's.


def test_with_frozen_adds_a_models_patterns_to_the_configured_ones():
  params = _params()
  configured = optimizers.make_optimizer(
      schedule=optimizers.constant_schedule(0.1), frozen_patterns=(r"^encoder/",)
  )
  assert configured.with_frozen([r"^encoder/"]) is configured
  opt = configured.with_frozen([r"^decoder/norm/"])
  assert opt.frozen_patterns == (r"^encoder/", r"^decoder/norm/")
  updates, _ = opt.tx.update(_grads(params), opt.tx.init(params), params)
  moved = jax.tree_util.tree_map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
  assert moved == {
      "encoder": {"layers_0": {"kernel": False}},
      "decoder": {"layers_0": {"kernel": True}, "norm": {"scale": False}},
  }


def test_frozen_pattern_that_matches_nothing_is_an_error():
  opt = optimizers.make_optimizer(frozen_patterns=(r"^memory_encoder/",))
  with pytest.raises(ValueError, match=r"'\^memory_encoder/' matches no parameter"):
    opt.tx.init(_params())


def test_adamw_first_step_and_global_norm_clipping():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([30.0, -40.0])}  # Global norm 50.
  opt = optimizers.make_optimizer(
      optimizer_fn=optimizers.adamw, schedule=optimizers.constant_schedule(0.1)
  )
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  # Adam's first step is lr * sign(g); decoupled weight decay adds lr * wd * p.
  np.testing.assert_allclose(
      updates["w"], -0.1 * (np.sign([30.0, -40.0]) + 0.01 * np.array([1.0, -2.0])), rtol=1e-4
  )
  clipped = optimizers.make_optimizer(
      optimizer_fn=lambda learning_rate: optax.sgd(learning_rate),
      schedule=optimizers.constant_schedule(1.0),
      max_grad_norm=5.0,
  )
  updates, _ = clipped.tx.update(grads, clipped.tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-3.0, 4.0], rtol=1e-6)


def test_param_groups_get_their_own_transformation():
  groups = {"norm/": optax.sgd(0.1)}
  opt = optimizers.make_optimizer(
      optimizers.adamw, optimizers.constant_schedule(1e-3), (), None, groups
  )
  params = _params()
  updates, _ = opt.tx.update(_grads(params), opt.tx.init(params), params)
  np.testing.assert_allclose(updates["decoder"]["norm"]["scale"], -0.05)  # sgd: -lr * g
  adam = optax.adamw(1e-3, weight_decay=0.01)
  want, _ = adam.update(_grads(params), adam.init(params), params)
  np.testing.assert_allclose(
      updates["encoder"]["layers_0"]["kernel"], want["encoder"]["layers_0"]["kernel"]
  )
  with pytest.raises(ValueError, match="param_groups 'nope'"):
    optimizers.make_optimizer(param_groups={"nope": optax.sgd(0.1)}).tx.init(params)
