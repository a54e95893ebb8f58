"""Autoregressive decoding over the decoder's KV cache: greedy, sampling, beam search.

The cache is created by one `decode=True` call on a full-length dummy input
(it only sizes the cache), then each step feeds one token. T5 starts decoding
from id 0 (padding) and stops at EOS (id 1); positions after EOS are 0.

Written by hand after T5X's decoding.py rather than imported from it: T5X
pulls in its whole training stack, and its beam search assumes every cache
leaf but the scalars has a batch axis (ours has `key_positions` [max_len]).
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lumenvq.model.network import Transformer

EOS_ID = 1


def init_cache(
    model: Transformer, params, encoded, encoder_mask, max_length: int, model_state=None
):
  """The "cache" collection. `model_state` (the collections besides "params", e.g. VQ
  attention's "quantizer" codebooks) is read by every call, never changed."""
  dummy = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
  _, variables = model.apply(
      {"params": params, **(model_state or {})},
      encoded,
      encoder_mask,
      dummy,
      decode=True,
      method=Transformer.decode,
      mutable=["cache"],
  )
  return variables["cache"]


def _step_fn(model: Transformer, params, encoded, encoder_mask, model_state=None):
  """(cache, tokens [n]) -> (next-token logits [n, vocab], cache): one decoder step."""

  def step(cache, tokens):
    logits, variables = model.apply(
        {"params": params, **(model_state or {}), "cache": cache},
        encoded,
        encoder_mask,
        tokens[:, None],
        decode=True,
        method=Transformer.decode,
        mutable=["cache"],
    )
    return logits[:, -1], variables["cache"]

  return step


def _choose(logits, rng, temperature: float, topk: int):
  """Next token [n] from logits [n, vocab]: argmax at temperature 0, else a sample
  of softmax(logits / temperature), restricted to the `topk` best when topk > 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if topk:
    # Sampling among exactly k candidates (not "logits >= k-th value", which
    # keeps more than k on ties) and mapping back to vocabulary ids.
    top_logits, top_ids = lax.top_k(logits, topk)
    pick = jax.random.categorical(rng, top_logits, axis=-1)
    return jnp.take_along_axis(top_ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_decode(
    model: Transformer,
    params,
    encoded,
    encoder_mask,
    max_length: int,
    rng: Optional[Any],
    temperature: float = 1.0,
    topk: int = 0,
    eos_id: int = EOS_ID,
    model_state=None,
):
  """Sampled tokens [b, max_length]; positions after EOS are 0.

  `temperature` and `topk` are Python numbers (they pick the code path);
  temperature 0 is greedy and needs no `rng`. The same rng gives the same tokens.
  """
  if temperature < 0:
    raise ValueError(f"sample_decode: temperature must be >= 0, got {temperature}")
  if not 0 <= topk <= model.config.vocab_size:
    raise ValueError(
        f"sample_decode: topk must be in [0, vocab_size=" f"{model.config.vocab_size}], got {topk}"
    )
  if temperature > 0 and rng is None:
    raise ValueError("sample_decode: temperature > 0 needs an rng")
  step = _step_fn(model, params, encoded, encoder_mask, model_state)
  batch = encoded.shape[0]

  def body(carry, key):
    cache, token, done = carry
    logits, cache = step(cache, token)
    nxt = jnp.where(done, 0, _choose(logits, key, temperature, topk))
    return (cache, nxt, done | (nxt == eos_id)), nxt

  keys = None if temperature == 0 else jax.random.split(rng, max_length)
  init = (
      init_cache(model, params, encoded, encoder_mask, max_length, model_state),
      jnp.zeros((batch,), jnp.int32),
      jnp.zeros((batch,), bool),
  )
  _, tokens = lax.scan(body, init, keys, length=max_length)
  return tokens.T


def greedy_decode(
    model: Transformer,
    params,
    encoded,
    encoder_mask,
    max_length: int,
    eos_id: int = EOS_ID,
    model_state=None,
):
  """Argmax tokens [b, max_length]; positions after EOS are 0."""
  return sample_decode(
      model,
      params,
      encoded,
      encoder_mask,
      max_length,
      rng=None,
      temperature=0.0,
      eos_id=eos_id,
      model_state=model_state,
  )


def brevity_penalty(alpha: float, length):
  """GNMT length normalisation (Wu et al. 2016), as in T5X: ((5 + len) / 6) ** alpha.
  Beam scores are log p(sequence) / brevity_penalty(alpha, generated length incl. EOS)."""
  return ((5.0 + length) / 6.0) ** alpha


class _BeamState(NamedTuple):
  step: Any  # scalar: tokens generated so far by every live beam
  live_seqs: Any  # [b, beam, max_length + 1], column 0 is the start token 0
  live_logp: Any  # [b, beam] sum of log-probs, sorted best first
  finished_seqs: Any  # [b, beam, max_length + 1]
  finished_scores: Any  # [b, beam] normalised, sorted best first; -inf = empty slot
  cache: Any  # "cache" collection over b * beam rows


def _batch_axis_leaves(model, params, encoded, encoder_mask, max_length, cache, model_state):
  """Which cache leaves carry the batch axis (True) and so follow their beam.

  Found by sizing the cache at batch + 1 (shapes only), not by matching the
  leading dimension, which would also catch `key_positions` [max_len] whenever
  max_len happens to equal batch * beam.
  """
  grow = lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1,) + x.shape[1:], x.dtype)
  bigger = jax.eval_shape(
      lambda p, e, m: init_cache(model, p, e, m, max_length, model_state),
      params,
      grow(encoded),
      grow(encoder_mask),
  )
  return jax.tree.map(lambda a, b: a.ndim > 0 and a.shape[0] != b.shape[0], cache, bigger)


def _take(x, idx):
  """x [b, n, ...] gathered along axis 1 by idx [b, m] -> [b, m, ...]."""
  return x[jnp.arange(x.shape[0])[:, None], idx]


def beam_search(
    model: Transformer,
    params,
    encoded,
    encoder_mask,
    max_length: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    eos_id: int = EOS_ID,
    model_state=None,
):
  """(tokens [b, beam, max_length], scores [b, beam]), best first; after EOS tokens are 0.

  As in T5X: each step extends the live beams, keeps the 2 * beam best
  candidates (so that `beam` of them survive even if every live beam just
  ended), moves those that ended into a separate top-`beam` finished set scored
  with `brevity_penalty`, and stops once no live beam can still beat the worst
  finished one. Unlike T5X, a sequence that reaches max_length without EOS is
  finished there with its normalised score, so every score returned is
  comparable. Slots for which no sequence exists have score -inf.
  The cache and the encoder outputs live flattened at [b * beam] rows.
  """
  vocab = model.config.vocab_size
  if beam_size < 1 or vocab < 2 or max_length < 1:
    raise ValueError(
        f"beam_search: needs beam_size >= 1 (got {beam_size}), "
        f"max_length >= 1 (got {max_length}), vocab_size >= 2 (got {vocab})"
    )
  batch, k = encoded.shape[0], beam_size
  encoded = jnp.repeat(encoded, k, axis=0)  # row r * k + j is beam j of batch row r
  encoder_mask = jnp.repeat(encoder_mask, k, axis=0)
  cache = init_cache(model, params, encoded, encoder_mask, max_length, model_state)
  on_batch = _batch_axis_leaves(
      model, params, encoded, encoder_mask, max_length, cache, model_state
  )
  step = _step_fn(model, params, encoded, encoder_mask, model_state)
  neg_inf = jnp.array(-jnp.inf, jnp.float32)

  def gather_cache(cache, parent):  # parent [b, k]: the beam each new beam extends
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
    return jax.tree.map(lambda x, b: x[rows] if b else x, cache, on_batch)

  def not_done(s: _BeamState):
    # log-probs only fall as a sequence grows, so a live beam's best possible
    # score is its log-prob over the largest penalty among the lengths ahead
    # (the penalty is monotone in length, so that is one of the two ends).
    best_penalty = jnp.maximum(
        brevity_penalty(alpha, s.step + 1.0), brevity_penalty(alpha, float(max_length))
    )
    can_improve = s.live_logp[:, 0] / best_penalty > s.finished_scores[:, -1]
    return (s.step < max_length) & jnp.any(can_improve)

  def body(s: _BeamState):
    i = s.step
    logits, cache = step(s.cache, s.live_seqs[:, :, i].reshape(-1))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    cand_logp, cand = lax.top_k((s.live_logp[:, :, None] + logp).reshape(batch, -1), 2 * k)
    parent, token = cand // vocab, cand % vocab
    seqs = _take(s.live_seqs, parent).at[:, :, i + 1].set(token)
    ended = (token == eos_id) | (i + 1 == max_length)

    scores = jnp.where(ended, cand_logp / brevity_penalty(alpha, i + 1.0), neg_inf)
    finished_scores, best = lax.top_k(jnp.concatenate([s.finished_scores, scores], axis=1), k)
    finished_seqs = _take(jnp.concatenate([s.finished_seqs, seqs], axis=1), best)

    live_logp, alive = lax.top_k(jnp.where(ended, neg_inf, cand_logp), k)
    return _BeamState(
        i + 1,
        _take(seqs, alive),
        live_logp,
        finished_seqs,
        finished_scores,
        gather_cache(cache, _take(parent, alive)),
    )

  seqs0 = jnp.zeros((batch, k, max_length + 1), jnp.int32)
  # Only beam 0 starts alive, so the first step does not expand k copies of it.
  live0 = jnp.full((batch, k), neg_inf).at[:, 0].set(0.0)
  init = _BeamState(
      jnp.array(0, jnp.int32), seqs0, live0, seqs0, jnp.full((batch, k), neg_inf), cache
  )
  final = lax.while_loop(not_done, body, init)
  return final.finished_seqs[:, :, 1:], final.finished_scores
