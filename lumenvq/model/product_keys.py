"""Product keys (Lample et al. 2019; Memory Layers at Scale): top-k over N = n^2 keys in O(n).

Each full key is the concatenation of one of n "left" half-keys and one of n "right"
half-keys, so a query's score against key (a, b) is `q_left . left[a] + q_right . right[b]`.
The k best full keys are then among the k x k sums of each half's k best, and the search costs
2 n half-key scores plus a top-k over k^2 candidates instead of N full-key scores. Exact: the
result equals a top-k over all N full keys (ties aside).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

KEY_AXES = ("memory_plus_heads", "memory_plus_halves", "memory_plus_keys", "memory_plus_key_dim")


def product_key_topk(query, half_keys, k: int):
  """Top-k full keys of `query` [..., H, key_dim] among `half_keys` [H, 2, n, key_dim/2].

  Returns (scores [..., H, k] float32, descending; indices [..., H, k] int32 in [0, n^2),
  index = a * n + b for left half-key a and right half-key b).
  """
  heads, halves, n, half_dim = half_keys.shape
  if halves != 2 or query.shape[-2:] != (heads, 2 * half_dim):
    raise ValueError(
        f"query shape {query.shape} and half keys {half_keys.shape}: expected "
        f"[..., H, key_dim] and [H, 2, n, key_dim/2]"
    )
  if not 1 <= k <= n:
    raise ValueError(f"memory+ knn k={k} must be in [1, n_keys={n}] (top-k of each half)")
  q = query.astype(jnp.float32).reshape(query.shape[:-1] + (2, half_dim))
  scores = jnp.einsum("...hsd,hsnd->...hsn", q, half_keys.astype(jnp.float32))  # [..., H, 2, n]
  best, idx = lax.top_k(scores, k)  # [..., H, 2, k]
  cand = best[..., 0, :, None] + best[..., 1, None, :]  # [..., H, k, k]
  top, flat = lax.top_k(cand.reshape(cand.shape[:-2] + (k * k,)), k)
  left = jnp.take_along_axis(idx[..., 0, :], flat // k, axis=-1)
  right = jnp.take_along_axis(idx[..., 1, :], flat % k, axis=-1)
  return top, (left * n + right).astype(jnp.int32)


class ProductKeys(nn.Module):
  """Multi-head product-key lookup: a biased query projection (optionally RMS-normalised) per
  head, exact product-key top-k, softmax (fp32) over the k scores of each head.

  Returns (indices [..., H*k] into the N = n_keys^2 values, weights [..., H*k]); the heads'
  (index, weight) pairs form one bag over the shared values, as in the reference.
  """

  n_keys: int
  heads: int
  knn: int
  key_dim: int
  query_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.key_dim % 2:
      raise ValueError(f"memory+ key_dim={self.key_dim} must be even (two half-keys)")
    query = nn.Dense(
        self.heads * self.key_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("embed", "memory_plus_query")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("memory_plus_query",)),
        name="query",
    )(x)
    query = query.reshape(query.shape[:-1] + (self.heads, self.key_dim))
    if self.query_norm:
      query = nn.RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="query_norm")(query)
    bound = self.key_dim**-0.5
    keys = self.param(
        "keys",
        nn.with_logical_partitioning(
            lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound),
            KEY_AXES,
        ),
        (self.heads, 2, self.n_keys, self.key_dim // 2),
        self.param_dtype,
    )
    scores, indices = product_key_topk(query, keys, self.knn)
    weights = jax.nn.softmax(scores, axis=-1)
    lead = x.shape[:-1]
    return indices.reshape(lead + (-1,)), weights.reshape(lead + (-1,))
