"""Weighted embedding bag: out[t] = sum_j weights[t, j] * table[indices[t, j]].

Written with a custom VJP rather than left to autodiff of `take` + `einsum` for two reasons
that matter at memory+ sizes (N ~ 1M rows): autodiff keeps the gathered rows [T, K, d] alive
from the forward to the backward pass (K = heads x knn = 128 rows per token), where the custom
backward gathers them again; and the backward is written as one scatter-add of the K weighted
rows per token into the table's cotangent, so no op but the table and its update carries an
N-sized dimension (no [T, N] one-hot, no dense [T, N] weight matrix). Accumulation is fp32.
"""

import jax
import jax.numpy as jnp


def _bag(table, indices, weights):
  rows = jnp.take(table, indices, axis=0, mode="clip")  # [..., K, d]
  return jnp.einsum(
      "...k,...kd->...d", weights.astype(jnp.float32), rows, preferred_element_type=jnp.float32
  )


@jax.custom_vjp
def embedding_bag(table, indices, weights):
  """[..., d] float32 from table [N, d], int indices [..., K] and weights [..., K].

  Indices are clipped into [0, N) (the product-key search never yields others)."""
  return _bag(table, indices, weights)


def _fwd(table, indices, weights):
  return _bag(table, indices, weights), (table, indices, weights)


def _bwd(res, g):
  table, indices, weights = res
  d = table.shape[-1]
  rows = jnp.take(table, indices, axis=0, mode="clip")
  g32 = g.astype(jnp.float32)
  d_weights = jnp.einsum("...d,...kd->...k", g32, rows, preferred_element_type=jnp.float32)
  contrib = weights.astype(jnp.float32)[..., None] * g32[..., None, :]  # [..., K, d]
  d_table = (
      jnp.zeros(table.shape, jnp.float32)
      .at[indices.reshape(-1)]
      .add(contrib.reshape(-1, d), mode="drop")
  )
  return d_table.astype(table.dtype), None, d_weights.astype(weights.dtype)


embedding_bag.defvjp(_fwd, _bwd)
