"""Tests for lumenvq.quant.pq_init: k-means++ seeding picks batch rows, by D^2, deterministically."""

import jax
import jax.numpy as jnp
import numpy as np

from lumenvq.quant import pq_init

_kmeans_pp = jax.jit(pq_init.kmeans_pp_centers, static_argnums=2, static_argnames="rounds")


def _random(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_kmeans_pp_picks_batch_rows_deterministically():
  xs = _random((200, 3, 4), 0)
  a = np.asarray(_kmeans_pp(xs, jnp.ones(200), 64, jax.random.key(1)))
  b = np.asarray(_kmeans_pp(xs, jnp.ones(200), 64, jax.random.key(1)))
  c = np.asarray(_kmeans_pp(xs, jnp.ones(200), 64, jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for g in range(3):
    rows = {tuple(r) for r in xs[:, g]}
    assert all(tuple(v) in rows for v in a[g])
    assert len({tuple(v) for v in a[g]}) == 64  # without replacement


def test_kmeans_pp_d2_sampling_covers_separated_clusters():
  # 8 tight clusters ~100 apart: exact k-means++ (rounds >= C) takes one center per
  # cluster; uniform sampling would succeed with probability 8!/8^8 = 0.2%.
  centers = _random((8, 1, 2), 3, scale=100.0)
  xs = (centers[:, None] + _random((8, 50, 1, 2), 4, scale=0.01)).reshape(400, 1, 2)
  for seed in range(3):
    got = np.asarray(_kmeans_pp(xs, jnp.ones(400), 8, jax.random.key(seed), rounds=8))[0]
    nearest = np.argmin(((got[:, None] - centers[None, :, 0]) ** 2).sum(-1), axis=1)
    assert sorted(nearest) == list(range(8))


def test_kmeans_pp_skips_masked_rows_and_handles_small_batches():
  xs = _random((10, 2, 3), 5)
  w = jnp.array([1.0] * 5 + [0.0] * 5)
  got = np.asarray(_kmeans_pp(xs, w, 16, jax.random.key(0), rounds=4))
  assert got.shape == (2, 16, 3)
  for g in range(2):
    valid = {tuple(r) for r in xs[:5, g]}
    assert all(tuple(v) in valid for v in got[g])  # surplus centers repeat valid rows
