"""Codebook seeding for the product quantizer: k-means++ D^2 sampling over a (sharded) batch.

Exact k-means++ picks one center per round, C rounds; with C = 65536 codes that is 65536
sequential passes over the batch. After the first center we therefore pick
``ceil((C - 1) / (rounds - 1))`` centers per round (the k-means|| variant of Bahmani et al.,
2012): with ``rounds >= C`` this is exact k-means++, and the total distance work is one
encode pass whatever ``rounds`` is.

Sampling without replacement from the D^2 distribution is a Gumbel top-k on
``log D^2 + Gumbel``. The Gumbel noise of each row is keyed by its *global* row index, and
shards merge their local top-k, so a batch split over devices gives the same centers as the
whole batch on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _axis_index_and_size(axis_name):
  if axis_name is None:
    return jnp.int32(0), 1
  return lax.axis_index(axis_name), lax.axis_size(axis_name)


def _gather_invariant(a, axis_name, me, shards):
  """Concatenates per-shard [G, k] arrays along axis 1 in device order, replicated.

  A psum of zero-padded slots rather than all_gather: the result is typed invariant under
  shard_map's check, which an all_gather's is not, and psum exists on every jax we support.
  """
  k = a.shape[1]
  buf = jnp.zeros((a.shape[0], k * shards), a.dtype)
  return lax.psum(lax.dynamic_update_slice_in_dim(buf, a, me * k, axis=1), axis_name)


def kmeans_pp_centers(xs, weights, num_codes: int, key, *, rounds: int = 256, axis_name=None):
  """D^2-sampled centers per subspace, drawn from the batch rows.

  Round 0 picks one center uniformly (as k-means++); rounds 1.. pick the other C - 1,
  ceil((C - 1) / (rounds - 1)) per round, by Gumbel top-k on log D^2.

  Args:
    xs: [n_local, G, s] batch vectors split into subspaces (this device's shard).
    weights: [n_local]; rows with weight 0 (padding) are never picked.
    num_codes: C, centers per subspace.
    key: PRNG key, identical on all devices.
    rounds: sampling rounds; >= C is exact k-means++.
    axis_name: mesh axis the batch is sharded over (inside shard_map), or None. Each round
      exchanges D x k candidate scores per subspace and fetches the k winners' vectors
      from their owners, so seeding sends G x D x C scalars plus one codebook in total.

  Returns:
    [G, C, s] centers, identical on every device. When the batch has fewer usable rows than
    C, the surplus centers repeat picked rows: they lose every tie, get no assignments and
    are reset from later batches by the quantizer's dead-code reset.
  """
  n_local, g, s = xs.shape
  me, shards = _axis_index_and_size(axis_name)
  rounds = max(2, min(rounds, num_codes))
  k = max(1, -(-(num_codes - 1) // (rounds - 1)))
  rest = -(-(num_codes - 1) // k)  # rounds after round 0
  xs = jnp.asarray(xs, jnp.float32)
  valid = jnp.asarray(weights) > 0
  rows = jnp.arange(n_local, dtype=jnp.int32)
  global_rows = rows + me * n_local
  x_norm = jnp.sum(xs * xs, axis=-1)  # [n, G]
  garange = jnp.arange(g)

  def pick(round_idx, log_d2, num):
    round_key = jax.random.fold_in(key, round_idx)
    # Noise keyed by the global row index: independent of how the batch is sharded.
    noise = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(round_key, r), (g,)))(
        global_rows
    )
    score = jnp.where(valid[:, None], log_d2 + noise, -jnp.inf).T  # [G, n]
    if n_local < num:  # top_k needs at least num candidates per shard
      score = jnp.pad(score, ((0, 0), (0, num - n_local)), constant_values=-jnp.inf)
    val, idx = lax.top_k(score, num)  # [G, num]; ties -> lower index
    gidx = jnp.minimum(idx, n_local - 1) + me * n_local
    if axis_name is not None:
      # Device order is global-row order, so the merge breaks ties as one device would.
      val = _gather_invariant(val, axis_name, me, shards)
      gidx = _gather_invariant(gidx, axis_name, me, shards)
      _, sel = lax.top_k(val, num)
      gidx = jnp.take_along_axis(gidx, sel, axis=1)
    local = gidx - me * n_local
    mine = (local >= 0) & (local < n_local)
    vec = xs[jnp.clip(local, 0, n_local - 1), garange[:, None]]  # [G, num, s]
    vec = jnp.where(mine[..., None], vec, 0.0)
    if axis_name is not None:  # fetch each winner from the shard that owns it
      vec = lax.psum(vec, axis_name)
    return vec, jnp.where(mine, local, n_local)  # n_local: not here, dropped below

  def cover(d2, vec, local):
    dots = jnp.einsum("ngs,gks->ngk", xs, vec, precision=lax.Precision.HIGHEST)
    dist = x_norm[..., None] - 2.0 * dots + jnp.sum(vec * vec, -1)[None]
    d2 = jnp.minimum(d2, jnp.maximum(jnp.min(dist, axis=-1), 0.0))
    # Picked rows are exactly covered; the expansion above may leave a rounding residue.
    return d2.at[local, garange[:, None]].set(0.0, mode="drop")

  first, local = pick(0, jnp.zeros((n_local, g), jnp.float32), 1)
  d2 = cover(jnp.full((n_local, g), jnp.inf, jnp.float32), first, local)

  def body(round_idx, carry):
    d2, centers = carry
    vec, local = pick(round_idx, jnp.log(d2), k)
    centers = lax.dynamic_update_slice_in_dim(centers, vec, 1 + (round_idx - 1) * k, axis=1)
    return cover(d2, vec, local), centers

  centers = jnp.zeros((g, 1 + rest * k, s), jnp.float32).at[:, :1].set(first)
  _, centers = lax.fori_loop(1, rest + 1, body, (d2, centers))
  return centers[:, :num_codes]
