"""VQ attention (Transformer-VQ, Lingle 2023; LongVQ, Liu et al. 2024): linear-time
attention over keys quantized to S codes per head.

Every key is replaced by its head's nearest codeword (EMA codebooks of the project's
``ProductQuantizer``, one subspace per head, straight-through). Queries attend exactly,
with T5's relative position biases, to a window of blocks of L positions around their
own block; every key outside the window is summarised per code by its count and the sum
of its values. With quantized keys the scores of all keys sharing a code are equal, so

    softmax over all keys  ==  one joint normalisation of  exp(window scores)  and
                               count_s * exp(q . c_s + far bias)  (values: value sums),

exactly: VQ attention *is* dense attention over the quantized keys, at cost
O(length * (window + S)). T5 puts every key at distance >= relative_attention_max_distance
in its farthest bucket, so with ``block_length`` >= that distance the keys outside the
window all get one bias per head (and side): ``far`` below.

* causal (decoder self-attention): window = previous + current block; the per-code
  counts and value sums of everything older are carried across blocks with ``lax.scan``.
  Incremental decoding keeps only the window and those sums (constant memory per step).
* bidirectional (encoder): window = previous, current and next block; codes before the
  window (a running sum) and after it (total minus the rest) with the far-past and
  far-future biases.

Positions outside the window are assumed to lie >= max distance away, which holds for
consecutive positions (the readers' `[question ; memory]` positions skip over question
padding, so a few pairs near the window edge get the far bias a little early there).
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from lumenvq.quant import quantizer

METRICS_NAME = "vq_attention_metrics"  # What each layer sows into "intermediates".
LOGGED_METRICS = ("codebook_usage", "relative_reconstruction_error")
_FAR = 2**30  # A key position offset past every bucket boundary.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VQAttentionConfig:
  """Settings of VQ attention (``T5Config.vq_attention``).

  num_codes: S codes per head (Transformer-VQ: 512). block_length: L; must be >=
  T5Config.relative_attention_max_distance. commitment_weight: weight of the keys'
  commitment loss added to the training loss (Transformer-VQ: 1e-4). ema_decay,
  dead_code_threshold: of the codebooks' EMA (Transformer-VQ: 0.99). far_key_gradient:
  keys outside the exact window also get dense attention's straight-through gradient
  (Transformer-VQ: off; they get none): exact, but S x dv x d more work per query.
  """

  num_codes: int = 512
  block_length: int = 512
  commitment_weight: float = 1e-4
  ema_decay: float = 0.99
  dead_code_threshold: float = 0.01
  far_key_gradient: bool = False

  def __post_init__(self):
    for field in ("num_codes", "block_length"):
      if getattr(self, field) <= 0:
        raise ValueError(f"VQAttentionConfig.{field} must be positive, got {getattr(self, field)}")
    if self.commitment_weight < 0:
      raise ValueError(
          f"VQAttentionConfig.commitment_weight must be >= 0, got {self.commitment_weight}"
      )

  def check(self, max_distance: int):
    if self.block_length < max_distance:
      raise ValueError(
          f"VQAttentionConfig.block_length={self.block_length} < "
          f"T5Config.relative_attention_max_distance={max_distance}: keys outside the exact "
          "window would not all sit in T5's farthest bucket"
      )


class BlockBias(NamedTuple):
  """What the network hands VQ attention instead of a [b, h, q, k] bias.

  window: relative position bias of each block's queries to its window's keys,
    [b or 1, blocks or 1, h, L, W] (one decoding step: [1, 1, h, 1, 2L]).
  far: [h, 2] bias of keys beyond the window, before and after the query.
  key_mask: [b, l] bool (None in a decoding step).
  block_length, bidirectional: static.
  """

  window: Any
  far: Any
  key_mask: Any
  block_length: int
  bidirectional: bool


def _far_bias(relpos):
  zero = jnp.zeros((1, 1), jnp.int32)
  return relpos(zero, jnp.array([[-_FAR, _FAR]], jnp.int32))[0, :, 0].astype(jnp.float32)


def block_bias(relpos, positions, key_mask, config: VQAttentionConfig, *, bidirectional: bool):
  """BlockBias of a full sequence; `relpos` is the stack's RelativePositionBiases,
  `positions` [b, l] or None for 0..l-1 (then one bias serves every block)."""
  cl = config.block_length
  side = 2 if bidirectional else 1  # blocks of the window before the query's next one
  if positions is None:
    q_pos = jnp.arange(cl)[None, None]
    k_pos = jnp.arange(-cl, side * cl)[None, None]
  else:
    blocks = _blocked(positions, cl, axis=1)  # [b, nb, L]
    k_pos = jnp.concatenate(_neighbours(blocks, bidirectional, axis=1), axis=-1)
    q_pos = blocks
  window = relpos(q_pos, k_pos)  # [1, b or 1, nb or 1, h, L, W]: relpos adds a batch axis
  return BlockBias(window[0], _far_bias(relpos), key_mask, cl, bidirectional)


def decode_bias(relpos, position, config: VQAttentionConfig):
  """BlockBias of one decoding step at `position` (int scalar): window = its block's
  predecessor and itself."""
  cl = config.block_length
  k_pos = (position // cl - 1) * cl + jnp.arange(2 * cl)
  window = relpos(jnp.reshape(position, (1, 1)), k_pos[None])[:, None]
  return BlockBias(window, _far_bias(relpos), None, cl, False)


def _blocked(x, cl, axis):
  """x with `axis` padded to a multiple of cl (zeros) and split into [nb, cl]."""
  pad = -x.shape[axis] % cl
  x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
  return x.reshape(x.shape[:axis] + (-1, cl) + x.shape[axis + 1 :])


def _neighbours(blocks, bidirectional, axis):
  """(previous, current[, next]) block of every block along `axis` (zeros past the ends)."""
  zero = jnp.zeros_like(lax.slice_in_dim(blocks, 0, 1, axis=axis))
  prev = jnp.concatenate([zero, lax.slice_in_dim(blocks, 0, -1, axis=axis)], axis=axis)
  if not bidirectional:
    return prev, blocks
  nxt = jnp.concatenate([lax.slice_in_dim(blocks, 1, None, axis=axis), zero], axis=axis)
  return prev, blocks, nxt


def code_stats(codes, values, mask, num_codes: int, keys=None):
  """Per-code counts [b, h, S] and value sums [b, h, S, dv] of keys codes [b, n, h] with
  values [b, n, h, dv] where mask [b, n]; a one-hot matmul (MXU-friendly, no scatter).

  With `keys` [b, n, h, d] (straight-through quantized) also the per-code sums of
  delta = keys - stop_gradient(keys) [b, h, S, d] and of value x delta [b, h, S, dv, d]:
  zero in value, they carry the keys' gradient through the summary (see `_attend`).
  """
  onehot = jax.nn.one_hot(codes, num_codes, dtype=jnp.float32) * mask[:, :, None, None]
  counts = jnp.sum(onehot, axis=1)
  values = values.astype(jnp.float32)
  sums = jnp.einsum("bnhs,bnhd->bhsd", onehot, values)
  if keys is None:
    return counts, sums
  delta = keys.astype(jnp.float32)
  delta = delta - lax.stop_gradient(delta)
  dsums = jnp.einsum("bnhs,bnhd->bhsd", onehot, delta)
  vdsums = jnp.einsum("bnhs,bnhe,bnhd->bhsed", onehot, values, delta)
  return counts, sums, dsums, vdsums


def _attend(q, k, v, allowed, bias, summaries, codebook, drop):
  """Queries q [b, n, h, d] over window keys k / values v [b, W, h, d] (allowed/bias
  broadcast to [b, h, n, W]) and code summaries [(stats, far [h])] (stats: `code_stats`),
  one softmax.

  The summary's weight of a code, count x exp(q . c), is the sum of its keys' dense
  weights exp(q . key) only in value: it has no derivative in the keys. Where the stats
  hold the delta sums, the weights are taken to first order in delta, exp(q . c) x (1 +
  q . delta), which is exact in value (delta = 0) and in its first derivative, so each
  summarised key gets dense attention's straight-through gradient, in linear time.

  `drop(weights, i)` applies dropout to the unnormalised weights (identity without it).
  Rows with nothing to attend to give 0 (dense attention's masked rows are arbitrary too).
  """
  f32 = jnp.float32
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) + bias
  s = jnp.where(allowed, s, -jnp.inf)
  cq = jnp.einsum("bqhd,hsd->bhqs", q, codebook.astype(q.dtype), preferred_element_type=f32)
  code_scores = [
      jnp.where(stats[0][:, :, None] > 0, cq + far[None, :, None, None], -jnp.inf)
      for stats, far in summaries
  ]
  m = jnp.max(s, axis=-1)
  for c in code_scores:
    m = jnp.maximum(m, jnp.max(c, axis=-1))
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))[..., None]
  p = jnp.exp(s - m)
  den = jnp.sum(p, axis=-1)
  num = jnp.einsum("bhqk,bkhd->bqhd", drop(p, 0).astype(v.dtype), v, preferred_element_type=f32)
  qf = q.astype(f32)
  for i, (c, (stats, _)) in enumerate(zip(code_scores, summaries)):
    pc = jnp.exp(c - m)
    pd = drop(pc, i + 1)
    den = den + jnp.einsum("bhqs,bhs->bhq", pc, stats[0])
    num = num + jnp.einsum("bhqs,bhsd->bqhd", pd, stats[1])
    if len(stats) == 4:
      den = den + jnp.einsum("bhqs,bhsd,bqhd->bhq", pc, stats[2], qf)
      num = num + jnp.einsum("bhqs,bhsed,bqhd->bqhe", pd, stats[3], qf)
  den = jnp.moveaxis(jnp.where(den > 0, den, 1.0), 1, 2)[..., None]  # [b, q, h, 1]
  return num / den


def block_attention(q, k, v, codes, bias: BlockBias, codebook, drop, key_gradient=False):
  """VQ attention over a whole sequence: q, k [b, l, h, d], v [b, l, h, dv], codes
  [b, l, h], codebook [h, S, d]; out [b, l, h, dv] float32. One `lax.scan` step per block
  carries the code summary of the keys before its window; `key_gradient`: the summary
  also carries the keys' gradient (`_attend`)."""
  b, l, h, d = q.shape
  cl, num_codes, bidi = bias.block_length, codebook.shape[1], bias.bidirectional
  key_mask = jnp.ones((b, l), jnp.bool_) if bias.key_mask is None else bias.key_mask
  to_blocks = lambda x: jnp.moveaxis(_blocked(x, cl, axis=1), 1, 0)  # [nb, b, L, ...]
  qb, kb, vb, cb, mb = map(to_blocks, (q, k, v, codes, key_mask))
  nb, width = qb.shape[0], (3 if bidi else 2) * cl
  windows = [_neighbours(x, bidi, axis=0) for x in (kb, vb, cb, mb)]
  kw, vw, cw, mw = (jnp.concatenate(x, axis=2) for x in windows)  # [nb, b, W, ...]
  if bidi:
    allowed = jnp.ones((cl, width), jnp.bool_)
  else:
    allowed = jnp.arange(width)[None] <= jnp.arange(cl)[:, None] + cl
  per_block = bias.window.shape[1] != 1
  window_bias = jnp.moveaxis(bias.window, 1, 0) if per_block else jnp.zeros((nb,))
  stats = lambda c, x, m, keys: code_stats(c, x, m, num_codes, keys if key_gradient else None)
  dv = v.shape[-1]
  shapes = [(b, h, num_codes), (b, h, num_codes, dv)]
  if key_gradient:
    shapes += [(b, h, num_codes, d), (b, h, num_codes, dv, d)]
  zeros = tuple(jnp.zeros(shape, jnp.float32) for shape in shapes)
  if bidi:  # Everything, so that "after the window" = total - before - window.
    add = lambda acc, x: (jax.tree.map(jnp.add, acc, stats(*x)), None)
    total = lax.scan(add, zeros, (cb, vb, mb, kb))[0]

  def body(before, xs):
    i, qn, kn, vn, cn, mn, wn, prev = xs
    summaries = [(before, bias.far[:, 0])]
    if bidi:
      inside = stats(cn, vn, mn, kn)
      after = jax.tree.map(lambda t, a, w: t - a - w, total, before, inside)
      summaries.append((after, bias.far[:, 1]))
    out = _attend(
        qn,
        kn,
        vn,
        allowed & mn[:, None, None, :],
        (wn if per_block else bias.window[:, 0]).astype(jnp.float32),
        summaries,
        codebook,
        lambda w, j: drop(w, i * 3 + j),
    )
    # The previous block leaves the window of the next one.
    return jax.tree.map(jnp.add, before, stats(*prev)), out

  prev = (windows[2][0], windows[1][0], windows[3][0], windows[0][0])  # codes, values, mask, keys
  xs = (jnp.arange(nb), qb, kw, vw, cw, mw, window_bias, prev)
  _, out = lax.scan(body, zeros, xs)
  return jnp.moveaxis(out, 0, 1).reshape(b, nb * cl, h, -1)[:, :l]


def _decode_step(cache, q, k, v, codes, bias: BlockBias, codebook):
  """One causal query at cache["index"]: the window holds the previous and the current
  block (2L keys); at a block boundary the oldest block moves into the code summary."""
  cl, num_codes = bias.block_length, codebook.shape[1]
  p = cache["index"]
  block, offset = p // cl, p % cl

  def shift(c):
    old = jnp.broadcast_to(block >= 2, c["codes"].shape[:2])[:, :cl]  # block n-2 existed
    counts, sums = code_stats(c["codes"][:, :cl], c["values"][:, :cl], old, num_codes)
    roll = lambda x: jnp.concatenate([x[:, cl:], jnp.zeros_like(x[:, cl:])], axis=1)
    return {
        "keys": roll(c["keys"]),
        "values": roll(c["values"]),
        "codes": roll(c["codes"]),
        "counts": c["counts"] + counts,
        "sums": c["sums"] + sums,
        "index": c["index"],
    }

  cache = lax.cond((offset == 0) & (p > 0), shift, lambda c: c, cache)
  put = lambda x, new: lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), cl + offset, 1)
  cache = dict(
      cache,
      keys=put(cache["keys"], k),
      values=put(cache["values"], v),
      codes=put(cache["codes"], codes),
      index=p + 1,
  )
  j = jnp.arange(2 * cl)
  allowed = ((j >= cl) | (block >= 1)) & (j <= cl + offset)
  out = _attend(
      q,
      cache["keys"],
      cache["values"],
      allowed,
      bias.window[:, 0].astype(jnp.float32),
      [((cache["counts"], cache["sums"]), bias.far[:, 0])],
      codebook,
      lambda w, _: w,
  )
  return cache, out


class VQAttention(nn.Module):
  """The attention core of `network.MultiHeadAttention` when its stack is 'vq': quantizes
  the projected keys and attends (the projections stay the dense layer's parameters).

  Variables: `key_quantizer/*` in the "quantizer" collection (per-head codebooks [1, h, S,
  d]; EMA-updated in train steps, i.e. when not deterministic). With `decode=True` the
  "cache" collection holds keys/values/codes of two blocks, per-code counts and value sums,
  and the index. Sows the quantizer's commitment loss and usage into "intermediates".
  """

  config: Any  # T5Config

  @nn.compact
  def __call__(self, query, key, value, bias: BlockBias, *, deterministic: bool, decode=False):
    cfg, vq = self.config, self.config.vq_attention
    b, l, h, d = key.shape
    key_hat, metrics, codes, codebooks = quantizer.ProductQuantizer(
        num_subspaces=h,
        codebook_size=vq.num_codes,
        ema_decay=vq.ema_decay,
        commitment_cost=vq.commitment_weight,
        dead_code_threshold=vq.dead_code_threshold,
        dtype=cfg.dtype,
        name="key_quantizer",
    )(key.reshape(b, l, h * d), train=not deterministic, mask=bias.key_mask, return_codes=True)
    self.sow(
        "intermediates",
        METRICS_NAME,
        {name: metrics[name] for name in ("commitment_loss",) + LOGGED_METRICS},
    )
    key_hat, codes = key_hat.reshape(key.shape), codes[..., 0, :]
    key_hat = nn.with_logical_constraint(key_hat, ("batch", "length", "heads", "kv"))
    codebook = lax.stop_gradient(codebooks[0])
    if decode:
      names = {
          "keys": (key.shape, key.dtype),
          "values": (value.shape, value.dtype),
          "codes": (codes.shape, jnp.int32),
          "counts": ((b, h, vq.num_codes), jnp.float32),
          "sums": ((b, h, vq.num_codes, value.shape[-1]), jnp.float32),
      }
      initialized = self.has_variable("cache", "index")
      window = lambda shape: (shape[0], 2 * vq.block_length) + shape[2:]
      cache = {
          n: self.variable(
              "cache",
              n,
              jnp.zeros,
              window(shape) if n in ("keys", "values", "codes") else shape,
              dt,
          )
          for n, (shape, dt) in names.items()
      }
      cache["index"] = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        if l != 1:
          raise ValueError(f"VQ attention decodes one position per call, got {l}")
        new, out = _decode_step(
            {n: v.value for n, v in cache.items()}, query, key_hat, value, codes, bias, codebook
        )
        for n, v in cache.items():
          v.value = new[n]
        return out.astype(cfg.dtype)
    rate = cfg.dropout_rate
    if deterministic or rate == 0:
      drop = lambda w, _: w
    else:  # By hand: the scan body is a plain function, so no nn.Dropout inside it.
      rng = self.make_rng("dropout")
      drop = (
          lambda w, i: w
          * jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, w.shape)
          / (1.0 - rate)
      )
    out = block_attention(
        query, key_hat, value, codes, bias, codebook, drop, key_gradient=vq.far_key_gradient
    )
    return out.astype(cfg.dtype)


def training_terms(intermediates, weight):
  """(loss term, metric sums) from what the VQ layers sowed: the commitment losses summed
  over layers, and the usage metrics averaged over layers, each x the loss weight (the
  trainer sums over microbatches and divides by the total weight). (None, {}) without."""
  flat = traverse_util.flatten_dict(dict(intermediates)) if intermediates else {}
  sown = [m for path, ms in flat.items() if path[-1] == METRICS_NAME for m in ms]
  if not sown:
    return None, {}
  commit = sum(m["commitment_loss"] for m in sown) * weight
  metrics = {"vq_attention/commitment_loss": commit}
  for name in LOGGED_METRICS:
    metrics[f"vq_attention/{name}"] = sum(m[name] for m in sown) / len(sown) * weight
  return commit, metrics
