"""Tests for lumenvq.quant.quantizer: variables, EMA closed form, resets, gradients, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lumenvq.quant import pq_codec
from lumenvq.quant.quantizer import (
    COUNT_AXES,
    CODEBOOK_AXES,
    QUANTIZER_COLLECTION,
    ProductQuantizer,
    export_codebooks,
)


def _random(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _step_fn(model, variables, x, seed, mask=None):
  (out, metrics), updated = model.apply(
      variables,
      x,
      train=True,
      mask=mask,
      mutable=[QUANTIZER_COLLECTION],
      rngs={"quantizer": jax.random.key(seed)},
  )
  return out, metrics, updated


_step = jax.jit(_step_fn, static_argnums=0)  # one compile per (model, shapes)


def _state(variables):
  return {k: np.asarray(v) for k, v in nn.unbox(variables[QUANTIZER_COLLECTION]).items()}


def _with_state(model, x, codebooks, counts, sums):
  """Variables of an already-seeded quantizer holding the given EMA state."""
  v = model.init({"params": jax.random.key(0)}, x)
  new = {"codebooks": codebooks, "ema_counts": counts, "ema_sums": sums}
  col = dict(v[QUANTIZER_COLLECTION])
  for k, a in new.items():
    col[k] = col[k].replace_boxed(jnp.asarray(a, jnp.float32))
  col["initialized"] = jnp.ones((), jnp.bool_)
  return {QUANTIZER_COLLECTION: col}


def test_variables_shapes_and_logical_axes():
  model = ProductQuantizer(num_subspaces=4, codebook_size=16, num_residual=2)
  v = model.init({"params": jax.random.key(0)}, jnp.zeros((3, 32)))
  col = v[QUANTIZER_COLLECTION]
  assert col["codebooks"].names == CODEBOOK_AXES and col["codebooks"].value.shape == (2, 4, 16, 8)
  assert col["ema_sums"].names == CODEBOOK_AXES and col["ema_sums"].value.shape == (2, 4, 16, 8)
  assert col["ema_counts"].names == COUNT_AXES and col["ema_counts"].value.shape == (2, 4, 16)
  assert not bool(col["initialized"])
  specs = nn.get_partition_spec(v)[QUANTIZER_COLLECTION]
  with nn.logical_axis_rules([("codebook", "model")]):
    mesh_spec = nn.logical_to_mesh_axes(specs["codebooks"])
  assert mesh_spec == P(None, None, "model", None)


def test_config_errors_name_the_setting():
  x = jnp.zeros((2, 30))
  with pytest.raises(ValueError, match="num_subspaces=4: model dimension d=30"):
    ProductQuantizer(num_subspaces=4, codebook_size=16).init({}, x)
  with pytest.raises(ValueError, match="codebook_size=70000"):
    ProductQuantizer(num_subspaces=5, codebook_size=70000).init({}, x)
  with pytest.raises(ValueError, match="ema_decay=1.0"):
    ProductQuantizer(num_subspaces=5, codebook_size=8, ema_decay=1.0).init({}, x)


def _ema_numpy(x, codebooks, counts, sums, decay, eps):
  g, c, s = codebooks.shape
  xs = x.reshape(-1, g, s).astype(np.float64)
  codes = ((xs[:, :, None] - codebooks[None]) ** 2).sum(-1).argmin(-1)
  bc, bs = np.zeros((g, c)), np.zeros((g, c, s))
  for i in range(xs.shape[0]):
    for j in range(g):
      bc[j, codes[i, j]] += 1
      bs[j, codes[i, j]] += xs[i, j]
  n = decay * counts + (1 - decay) * bc
  sm = decay * sums + (1 - decay) * bs
  tot = n.sum(-1, keepdims=True)
  smoothed = (n + eps) / (tot + c * eps) * tot
  return n, sm, sm / smoothed[..., None], bc


def test_one_ema_step_matches_numpy_closed_form():
  model = ProductQuantizer(
      num_subspaces=2,
      codebook_size=8,
      ema_decay=0.9,
      epsilon=1e-3,
      dead_code_threshold=0.0,
      chunk_size=3,
  )
  x = _random((24, 6), 6)
  cb = _random((1, 2, 8, 3), 7)
  counts = np.random.default_rng(8).uniform(0.5, 2.0, (1, 2, 8)).astype(np.float32)
  sums = cb * counts[..., None]
  v = _with_state(model, x, cb, counts, sums)
  out, metrics, upd = _step(model, v, x, 0)
  n, sm, new_cb, bc = _ema_numpy(x, cb[0], counts[0], sums[0], 0.9, 1e-3)
  st = _state(upd)
  np.testing.assert_allclose(st["ema_counts"][0], n, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(st["ema_sums"][0], sm, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(st["codebooks"][0], new_cb, rtol=1e-5, atol=1e-6)
  # The forward pass quantizes with the codebook from before the update.
  np.testing.assert_allclose(
      out, pq_codec.decode(pq_codec.encode(x, cb[0]), cb[0]), rtol=1e-6, atol=1e-6
  )
  p = bc / bc.sum(-1, keepdims=True)
  ppl = np.exp(-np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1))
  np.testing.assert_allclose(metrics["perplexity_per_subspace"][0], ppl, rtol=1e-5)
  np.testing.assert_allclose(metrics["codebook_usage_per_subspace"][0], (bc > 0).mean(-1))
  rel = ((x - out) ** 2).sum() / (x**2).sum()
  np.testing.assert_allclose(metrics["relative_reconstruction_error"], rel, rtol=1e-5)
  assert int(metrics["num_reset_codes"]) == 0


def test_eval_mode_changes_nothing():
  model = ProductQuantizer(num_subspaces=2, codebook_size=8)
  x = _random((24, 6), 9)
  cb = _random((1, 2, 8, 3), 10)
  v = _with_state(model, x, cb, np.ones((1, 2, 8)), cb)
  (_, _), upd = model.apply(v, x, train=False, mutable=[QUANTIZER_COLLECTION])
  for k, a in _state(upd).items():
    np.testing.assert_array_equal(a, _state(v)[k])


def test_dead_code_reset_replaces_only_starved_codes():
  kw = dict(num_subspaces=2, codebook_size=8, ema_decay=0.9, epsilon=1e-5)
  x = _random((32, 6), 11)
  cb = _random((1, 2, 8, 3), 12)
  cb[0, 0, 5] = 1e3  # far away: gets no rows, and its count is starved
  cb[0, 1, 2] = -1e3
  counts = np.ones((1, 2, 8), np.float32)
  counts[0, 0, 5] = counts[0, 1, 2] = 1e-4
  state = (cb, counts, cb * counts[..., None])
  reset_model = ProductQuantizer(dead_code_threshold=0.1, **kw)
  plain_model = ProductQuantizer(dead_code_threshold=0.0, **kw)
  _, m_reset, with_reset = _step(reset_model, _with_state(reset_model, x, *state), x, 1)
  _, _, without = _step(plain_model, _with_state(plain_model, x, *state), x, 1)
  a, b = _state(with_reset), _state(without)
  starved = np.zeros((2, 8), bool)
  starved[0, 5] = starved[1, 2] = True
  assert int(m_reset["num_reset_codes"]) == 2
  for key in ("codebooks", "ema_counts", "ema_sums"):
    np.testing.assert_array_equal(a[key][0][~starved], b[key][0][~starved])
  xs = x.reshape(32, 2, 3)
  for g, k in zip(*np.nonzero(starved)):
    assert any(np.array_equal(a["codebooks"][0, g, k], row) for row in xs[:, g])
    np.testing.assert_allclose(a["ema_counts"][0, g, k], b["ema_counts"][0, g].mean(), rtol=1e-6)


def test_straight_through_gradient_is_identity():
  model = ProductQuantizer(num_subspaces=4, codebook_size=16, commitment_cost=0.0)
  x = _random((5, 7, 16), 13)
  w = _random((5, 7, 16), 14)
  v = model.init({"params": jax.random.key(0)}, x)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(w * _step_fn(model, v, x, 1)[0])))(x)
  np.testing.assert_allclose(grad, w, rtol=0, atol=0)


def test_commitment_loss_gradient():
  model = ProductQuantizer(num_subspaces=2, codebook_size=4, commitment_cost=0.25)
  x = _random((6, 4), 15)
  v = model.init({"params": jax.random.key(0)}, x)

  def loss(x):
    out, metrics, _ = _step_fn(model, v, x, 1)
    return metrics["commitment_loss"], out

  (val, q), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  np.testing.assert_allclose(val, 0.25 * ((x - q) ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(grad, 0.25 * 2 * (x - q) / x.size, rtol=1e-5, atol=1e-7)


def test_mask_excludes_rows_from_statistics():
  model = ProductQuantizer(num_subspaces=2, codebook_size=8, ema_decay=0.5, dead_code_threshold=0.0)
  x = _random((40, 6), 16)
  mask = np.arange(40) % 3 != 0
  cb = _random((1, 2, 8, 3), 17)
  state = (cb, np.ones((1, 2, 8)), cb)
  _, m_masked, masked = _step(model, _with_state(model, x, *state), x, 2, mask=mask)
  _, m_kept, kept = _step(model, _with_state(model, x, *state), x[mask], 2)
  for k in ("ema_counts", "ema_sums", "codebooks"):
    np.testing.assert_allclose(_state(masked)[k], _state(kept)[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      m_masked["relative_reconstruction_error"], m_kept["relative_reconstruction_error"], rtol=1e-6
  )


def test_first_step_seeds_from_batch_and_training_lowers_error():
  model = ProductQuantizer(num_subspaces=4, codebook_size=32, ema_decay=0.8)
  x = _random((512, 16), 17)
  v = model.init({}, x)
  _, m0, v = _step(model, v, x, 0)
  assert bool(_state(v)["initialized"])
  assert 0 < float(m0["relative_reconstruction_error"]) < 0.5
  assert float(m0["codebook_usage"]) == 1.0  # k-means++ seeds are batch rows: all used
  for i in range(10):
    _, m, v = _step(model, v, x, i + 1)
  assert float(m["relative_reconstruction_error"]) < float(m0["relative_reconstruction_error"])


def test_residual_stages_reduce_error():
  x = _random((512, 16), 18)
  errs = []
  for r in (1, 2):
    model = ProductQuantizer(
        num_subspaces=4, codebook_size=16, num_residual=r, ema_decay=0.8, init_lloyd_iters=2
    )
    v = model.init({}, x)
    for i in range(3):
      _, m, v = _step(model, v, x, i)
    errs.append(float(m["relative_reconstruction_error"]))
    cb = export_codebooks(v)
    assert cb.shape == ((4, 16, 4) if r == 1 else (r, 4, 16, 4))
  assert errs[1] < 0.8 * errs[0], errs


def test_one_device_equals_eight_devices_under_shard_map():
  assert jax.device_count() >= 8
  kw = dict(
      num_subspaces=4,
      codebook_size=16,
      ema_decay=0.9,
      num_residual=2,
      dead_code_threshold=0.5,
      init_rounds=4,
      init_lloyd_iters=1,
      chunk_size=5,
  )
  single, sharded = ProductQuantizer(**kw), ProductQuantizer(axis_name="data", **kw)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  step8 = jax.jit(
      jax.shard_map(
          functools.partial(_step_fn, sharded),
          mesh=mesh,
          in_specs=(P(), P("data"), P()),
          out_specs=(P("data"), P(), P()),
      )
  )
  step1 = functools.partial(_step, single)
  batches = [_random((64, 16), 19), _random((64, 16), 20) * 1.5, _random((64, 16), 21)]
  v1 = v8 = single.init({}, batches[0])
  resets = 0
  for i, x in enumerate(batches):  # step 0 seeds; later steps update and reset
    out1, m1, v1 = step1(v1, x, i)
    out8, m8, v8 = step8(v8, x, i)
    resets += int(m1["num_reset_codes"])
    for k, a in _state(v1).items():
      np.testing.assert_allclose(_state(v8)[k], a, rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(out8, out1, rtol=1e-6, atol=1e-6)
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert resets > 0  # the reset path ran under sharding too
