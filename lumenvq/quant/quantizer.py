"""MEMORY-VQ product quantizer: a Flax Linen module with EMA codebooks.

Codebooks are not parameters: they follow an exponential moving average of the vectors
assigned to each code (decay 0.999 in MEMORY-VQ), so they live in their own variable
collection, ``"quantizer"``, that the trainer marks mutable in train steps:

  ============  =============  ===================================================
  name          shape          logical axes
  ============  =============  ===================================================
  codebooks     [R, G, C, s]   (quantizer_stage, subspace, codebook, subspace_dim)
  ema_counts    [R, G, C]      (quantizer_stage, subspace, codebook)
  ema_sums      [R, G, C, s]   (quantizer_stage, subspace, codebook, subspace_dim)
  initialized   []  bool       (none)
  ============  =============  ===================================================

R residual stages, G subspaces, C codes, s = d / G. The first train step seeds the codebooks
by k-means++ from its batch (``pq_init``); every train step then encodes, updates the EMA
statistics (summed over ``axis_name`` when the batch is sharded under shard_map), rebuilds
codebook = ema_sums / Laplace-smoothed ema_counts, and resets codes whose EMA usage fell
below ``dead_code_threshold`` of the subspace's mean usage to random vectors of the batch.
Train steps need the ``"quantizer"`` PRNG stream. Encode/decode of stored codes go through
``pq_codec`` with ``export_codebooks(variables)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lumenvq.quant import pq_codec, pq_init

QUANTIZER_COLLECTION = "quantizer"
RNG_STREAM = "quantizer"
CODEBOOK_AXES = ("quantizer_stage", "subspace", "codebook", "subspace_dim")
COUNT_AXES = ("quantizer_stage", "subspace", "codebook")


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def batch_statistics(xs, codes, weights, codebook_size: int, axis_name=None):
  """Per-code assignment counts [G, C] and assigned-vector sums [G, C, s] of one batch.

  Scatter-adds rather than one-hot matmuls: a [n, G, 65536] one-hot would not fit. Summed
  over ``axis_name`` so every data-parallel shard sees the global statistics.
  """
  n, g, s = xs.shape
  gi = jnp.broadcast_to(jnp.arange(g), (n, g))
  ci = codes.astype(jnp.int32)
  w = weights.astype(jnp.float32)
  counts = (
      jnp.zeros((g, codebook_size), jnp.float32)
      .at[gi, ci]
      .add(jnp.broadcast_to(w[:, None], (n, g)))
  )
  sums = jnp.zeros((g, codebook_size, s), jnp.float32).at[gi, ci].add(xs * w[:, None, None])
  return _psum(counts, axis_name), _psum(sums, axis_name)


def ema_update(ema_counts, ema_sums, counts, sums, codebooks, *, decay: float, epsilon: float):
  """One EMA step; returns (ema_counts, ema_sums, codebooks).

  Laplace smoothing, (n + eps) / (sum n + C eps) * sum n, keeps a starved code's vector
  finite (its sum and count shrink together) instead of dividing by ~0.
  """
  n = decay * ema_counts + (1.0 - decay) * counts
  s = decay * ema_sums + (1.0 - decay) * sums
  total = jnp.sum(n, axis=-1, keepdims=True)
  smoothed = (n + epsilon) / (total + n.shape[-1] * epsilon) * total
  safe = jnp.where(smoothed > 0, smoothed, 1.0)[..., None]
  new = jnp.where(smoothed[..., None] > 0, s / safe, codebooks)  # no data yet: keep
  return n, s, new


def reset_dead_codes(
    xs, weights, codebooks, ema_counts, ema_sums, key, *, threshold: float, axis_name=None
):
  """Moves codes used less than ``threshold`` x the subspace's mean EMA count onto batch rows.

  Rows are drawn uniformly from the global batch by global row index and fetched from the
  shard that owns them, so the result does not depend on how the batch is sharded. A reset
  code restarts at the mean count (an average code, which takes ~ln(1/threshold)/(1-decay)
  unused steps to be reset again). A draw that lands on a masked row leaves the code for
  the next step. Returns (codebooks, ema_counts, ema_sums, reset mask [G, C]).
  """
  n_local, g, s = xs.shape
  c = codebooks.shape[1]
  xs, weights = jnp.asarray(xs, jnp.float32), jnp.asarray(weights)
  if axis_name is None:
    me, shards = 0, 1
  else:
    me, shards = lax.axis_index(axis_name), lax.axis_size(axis_name)
  mean = jnp.mean(ema_counts, axis=-1, keepdims=True)
  dead = ema_counts < threshold * mean
  j = jax.random.randint(key, (g, c), 0, n_local * shards)
  mine = (j // n_local) == me
  row = j % n_local
  vec = jnp.where(mine[..., None], xs[row, jnp.arange(g)[:, None]], 0.0)
  ok = jnp.where(mine & (weights[row] > 0), 1.0, 0.0)
  vec, ok = _psum(vec, axis_name), _psum(ok, axis_name)
  reset = dead & (ok > 0)
  codebooks = jnp.where(reset[..., None], vec, codebooks)
  ema_counts = jnp.where(reset, mean, ema_counts)
  ema_sums = jnp.where(reset[..., None], vec * mean[..., None], ema_sums)
  return codebooks, ema_counts, ema_sums, reset


def export_codebooks(variables):
  """Codebooks for ``pq_codec`` from module variables: [G, C, s] if R == 1 else [R, G, C, s]."""
  cb = nn.unbox(variables[QUANTIZER_COLLECTION]["codebooks"])
  return cb[0] if cb.shape[0] == 1 else cb


class ProductQuantizer(nn.Module):
  """Product quantizer with EMA codebooks, straight-through output and usage metrics.

  Attributes:
    num_subspaces: G; the model dimension must be divisible by it.
    codebook_size: C codes per subspace (<= 65536; codes are uint8/uint16).
    num_residual: R stages, each quantizing what the previous ones left.
    ema_decay: EMA decay of counts and sums.
    epsilon: Laplace smoothing of the counts.
    commitment_cost: weight of ||x - sg(q)||^2 in metrics["commitment_loss"]; 0 as in
      MEMORY-VQ, where a commitment loss diverged.
    dead_code_threshold: reset codes whose EMA count < this x the subspace mean; 0 disables.
    init_rounds: k-means++ sampling rounds at seeding (exact k-means++ when >= C).
    init_lloyd_iters: Lloyd iterations on the seeding batch after k-means++.
    chunk_size: codes scored at once when encoding (memory ~ n * G * chunk_size floats).
    axis_name: mesh axis (or tuple) the batch is sharded over inside shard_map, else None.
    dtype: dtype of the returned quantized vectors; statistics are always float32.
  """

  num_subspaces: int
  codebook_size: int
  num_residual: int = 1
  ema_decay: float = 0.999
  epsilon: float = 1e-5
  commitment_cost: float = 0.0
  dead_code_threshold: float = 0.01
  init_rounds: int = 256
  init_lloyd_iters: int = 0
  chunk_size: int = pq_codec.DEFAULT_CHUNK_SIZE
  axis_name: Any = None
  dtype: Any = jnp.float32

  def _check(self, d: int):
    g, c, r = self.num_subspaces, self.codebook_size, self.num_residual
    if g < 1 or d % g:
      raise ValueError(f"num_subspaces={g}: model dimension d={d} is not divisible by it")
    pq_codec.code_dtype(c)  # names codebook_size when out of range
    if r < 1:
      raise ValueError(f"num_residual={r}: must be >= 1")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay={self.ema_decay}: must be in [0, 1)")
    if self.epsilon <= 0:
      raise ValueError(f"epsilon={self.epsilon}: must be > 0 (Laplace smoothing)")
    if self.dead_code_threshold < 0:
      raise ValueError(f"dead_code_threshold={self.dead_code_threshold}: must be >= 0")

  def _encode(self, xs, codebook):
    n, g, s = xs.shape
    return pq_codec.encode(xs.reshape(n, g * s), codebook, chunk_size=self.chunk_size)

  def _decode(self, codes, codebook):
    return pq_codec.decode(codes, codebook).reshape(*codes.shape, -1)

  def _seed(self, xs, w, key):
    """k-means++ (+ Lloyd) per stage on this batch; EMA state as if every past batch was it."""
    c, cbs, counts_all = self.codebook_size, [], []
    residual = xs
    for stage in range(self.num_residual):
      cb = pq_init.kmeans_pp_centers(
          residual,
          w,
          c,
          jax.random.fold_in(key, stage),
          rounds=self.init_rounds,
          axis_name=self.axis_name,
      )
      for _ in range(self.init_lloyd_iters):
        counts, sums = batch_statistics(residual, self._encode(residual, cb), w, c, self.axis_name)
        cb = jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1e-30)[..., None], cb)
      codes = self._encode(residual, cb)
      counts, _ = batch_statistics(residual, codes, w, c, self.axis_name)
      residual = residual - self._decode(codes, cb)
      cbs.append(cb)
      counts_all.append(counts)
    cbs, counts = jnp.stack(cbs), jnp.stack(counts_all)
    return cbs, counts, cbs * counts[..., None]

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None, return_codes: bool = False):
    """Quantizes x [..., d]; returns (x + stop_gradient(q - x), metrics).

    With ``return_codes`` it returns (out, metrics, codes [..., R, G] int32, codebooks
    [R, G, C, s]): the codes and the codebooks this forward used (before this step's EMA
    update), for callers that index per-code statistics (VQ attention's cache).

    mask ([...], optional): 0 marks padding rows, left out of statistics, seeding, resets
    and metrics (they are still quantized). Metrics: codebook_usage / perplexity (means;
    ``*_per_subspace`` [R, G]), relative_reconstruction_error sum||x-q||^2 / sum||x||^2,
    commitment_loss (differentiable mean over all rows of all shards) and
    num_reset_codes.
    """
    d = x.shape[-1]
    self._check(d)
    g, c, r = self.num_subspaces, self.codebook_size, self.num_residual
    s = d // g

    def var(name, shape, axes):
      return self.variable(
          QUANTIZER_COLLECTION,
          name,
          nn.with_logical_partitioning(jnp.zeros, axes),
          shape,
          jnp.float32,
      )

    cb_var = var("codebooks", (r, g, c, s), CODEBOOK_AXES)
    n_var = var("ema_counts", (r, g, c), COUNT_AXES)
    s_var = var("ema_sums", (r, g, c, s), CODEBOOK_AXES)
    init_var = self.variable(QUANTIZER_COLLECTION, "initialized", jnp.zeros, (), jnp.bool_)

    xs = jnp.asarray(x, jnp.float32).reshape(-1, g, s)
    w = (
        jnp.ones(xs.shape[:1], jnp.float32)
        if mask is None
        else jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1).astype(jnp.float32)
    )
    update = train and not self.is_initializing()
    codebooks, ema_n, ema_s = cb_var.value, n_var.value, s_var.value
    if update:
      seed_key, reset_key = jax.random.split(self.make_rng(RNG_STREAM))
      codebooks, ema_n, ema_s = lax.cond(
          init_var.value, lambda: (codebooks, ema_n, ema_s), lambda: self._seed(xs, w, seed_key)
      )
      init_var.value = jnp.ones((), jnp.bool_)

    residual, q = xs, jnp.zeros_like(xs)
    usage, perplexity, new_state, all_codes = [], [], [], []
    num_reset = jnp.zeros((), jnp.int32)
    for stage in range(r):
      codes = self._encode(residual, codebooks[stage])
      all_codes.append(codes)
      counts, sums = batch_statistics(residual, codes, w, c, self.axis_name)
      p = counts / jnp.maximum(jnp.sum(counts, -1, keepdims=True), 1e-30)
      usage.append(jnp.mean((counts > 0).astype(jnp.float32), -1))
      perplexity.append(jnp.exp(-jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0)), -1)))
      if update:
        n_r, s_r, cb_r = ema_update(
            ema_n[stage],
            ema_s[stage],
            counts,
            sums,
            codebooks[stage],
            decay=self.ema_decay,
            epsilon=self.epsilon,
        )
        if self.dead_code_threshold > 0:
          stage_key = jax.random.fold_in(reset_key, stage)
          no_reset = lambda cb, n_, s_: (cb, n_, s_, jnp.zeros(n_.shape, jnp.bool_))
          cb_r, n_r, s_r, reset = lax.cond(
              jnp.any(n_r < self.dead_code_threshold * jnp.mean(n_r, -1, keepdims=True)),
              lambda cb, n_, s_: reset_dead_codes(
                  residual,
                  w,
                  cb,
                  n_,
                  s_,
                  stage_key,
                  threshold=self.dead_code_threshold,
                  axis_name=self.axis_name,
              ),
              no_reset,
              cb_r,
              n_r,
              s_r,
          )
          num_reset = num_reset + jnp.sum(reset, dtype=jnp.int32)
        new_state.append((cb_r, n_r, s_r))
      q_stage = self._decode(codes, codebooks[stage])  # forward uses the pre-update codebook
      residual = residual - q_stage
      q = q + q_stage
    if update:
      cb_var.value, n_var.value, s_var.value = (jnp.stack(a) for a in zip(*new_state))

    sums = {
        "err": jnp.sum(w * jnp.sum((xs - q) ** 2, axis=(1, 2))),
        "norm": jnp.sum(w * jnp.sum(xs**2, axis=(1, 2))),
        # Differentiable; summed over axis_name, so each shard's gradient is its share of
        # the global mean, the convention for losses under shard_map.
        "commit": jnp.sum(w * jnp.sum((xs - lax.stop_gradient(q)) ** 2, axis=(1, 2))),
        "rows": jnp.sum(w),
    }
    sums = _psum(sums, self.axis_name)
    err, norm = sums["err"], sums["norm"]
    commit = self.commitment_cost * sums["commit"] / jnp.maximum(sums["rows"] * d, 1.0)
    usage, perplexity = jnp.stack(usage), jnp.stack(perplexity)
    metrics = {
        "codebook_usage": jnp.mean(usage),
        "codebook_usage_per_subspace": usage,
        "perplexity": jnp.mean(perplexity),
        "perplexity_per_subspace": perplexity,
        "relative_reconstruction_error": err / jnp.maximum(norm, 1e-30),
        "commitment_loss": commit,
        "num_reset_codes": num_reset,
    }
    out = xs + lax.stop_gradient(q - xs)
    out = out.reshape(x.shape).astype(self.dtype)
    if return_codes:
      codes = jnp.stack(all_codes, axis=-2).astype(jnp.int32).reshape(*x.shape[:-1], r, g)
      return out, metrics, codes, codebooks
    return out, metrics
