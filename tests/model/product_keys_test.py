"""Product keys: the k x k search equals a brute-force top-k over all N full keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model.product_keys import ProductKeys, product_key_topk


@pytest.mark.parametrize("n,k", [(8, 1), (8, 4), (16, 16)])
def test_topk_equals_brute_force_over_all_full_keys(n, k):
  heads, key_dim = 3, 6
  rng = np.random.default_rng(n * 100 + k)
  query = jnp.asarray(rng.normal(size=(2, 5, heads, key_dim)), jnp.float32)
  half = jnp.asarray(rng.normal(size=(heads, 2, n, key_dim // 2)), jnp.float32)
  scores, indices = product_key_topk(query, half, k)
  # Full key a*n + b is [left[a] ; right[b]].
  full = jnp.concatenate(
      [jnp.repeat(half[:, 0], n, axis=1), jnp.tile(half[:, 1], (1, n, 1))], axis=-1
  )  # [H, n*n, key_dim]
  brute = jnp.einsum("...hd,hnd->...hn", query, full)
  want_scores, want_indices = jax.lax.top_k(brute, k)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(indices, want_indices)


def test_rejects_knn_above_n_keys_and_mismatched_query():
  half = jnp.zeros((2, 2, 4, 3))
  with pytest.raises(ValueError, match="knn k=5"):
    product_key_topk(jnp.zeros((1, 2, 6)), half, 5)
  with pytest.raises(ValueError, match="expected"):
    product_key_topk(jnp.zeros((1, 2, 8)), half, 2)


def test_module_weights_are_a_softmax_per_head():
  module = ProductKeys(n_keys=8, heads=2, knn=3, key_dim=4, query_norm=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  variables = module.init(jax.random.PRNGKey(1), x)
  indices, weights = module.apply(variables, x)
  assert indices.shape == weights.shape == (2, 5, 6)
  assert int(indices.min()) >= 0 and int(indices.max()) < 64
  np.testing.assert_allclose(weights.reshape(2, 5, 2, 3).sum(-1), 1.0, rtol=1e-6)
