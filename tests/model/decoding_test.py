"""Decoding over the KV cache against the full (uncached) forward: greedy, sampling, beam
search (including an exhaustive search on a toy vocabulary), EOS padding, jit.

Every call goes through `Tiny.run`, which jits each decoding setting once: on two
shared cores compiling is the cost, so the tests reuse a handful of settings.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import decoding, network
from lumenvq.model.network_config import T5Config

NO_EOS = -1  # an id no token has, so decoding runs to max_length
LENGTH = 6


class Tiny:
  """A random 2+2-layer T5 over a batch of 2 inputs (row 1 padded)."""

  def __init__(self, vocab, seed):
    config = T5Config(
        vocab_size=vocab,
        emb_dim=32,
        num_heads=4,
        head_dim=8,
        mlp_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        dtype="float32",
    )
    self.model = network.Transformer(config)
    # Random weights drawn in numpy at the network's shapes: jitting the network's
    # own init would cost seconds of compiling and any weights serve these tests.
    rng = np.random.RandomState(seed)
    self.params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones(x.shape)
        if path[-1].key == "scale"
        else jnp.asarray(
            rng.normal(0.0, 1.0 if path[-1].key == "embedding" else x.shape[0] ** -0.5, x.shape),
            jnp.float32,
        ),
        nn.meta.unbox(network.abstract_params(config)),
    )
    enc = rng.randint(2, vocab, (2, 6))
    enc[1, 4:] = 0
    self.mask = jnp.asarray(enc > 0)
    self.encoded = jax.jit(
        lambda p, e: self.model.apply({"params": p}, e, method=network.Transformer.encode)
    )(self.params, jnp.asarray(enc))
    self._jitted = {}

  def run(self, fn, encoded=None, mask=None, **kwargs):
    """decoding.<fn>(model, params, encoded, mask, **kwargs) under jit. `rng`, `alpha`
    and `eos_id` are traced (so settings differing only there share one compile),
    the other keyword arguments are static."""
    encoded = self.encoded if encoded is None else encoded
    mask = self.mask if mask is None else mask
    traced = {name: kwargs.pop(name) for name in ("rng", "alpha", "eos_id") if name in kwargs}
    key = (fn, tuple(sorted(kwargs.items())), tuple(sorted(traced)))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
          lambda p, e, m, t: getattr(decoding, fn)(self.model, p, e, m, **kwargs, **t)
      )
    return self._jitted[key](self.params, encoded, mask, traced)

  def logp(self, tokens, encoded=None, mask=None):
    """Log-probs [n, len, vocab] of tokens [n, len] from the uncached forward
    (decoder input = tokens shifted right behind the start id 0)."""
    if "logp" not in self._jitted:

      def logp(p, e, m, t):
        dec_in = jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
        return jax.nn.log_softmax(
            self.model.apply({"params": p}, e, m, dec_in, method=network.Transformer.decode)
        )

      self._jitted["logp"] = jax.jit(logp)
    return self._jitted["logp"](
        self.params,
        self.encoded if encoded is None else encoded,
        self.mask if mask is None else mask,
        jnp.asarray(tokens, jnp.int32),
    )

  def scores(self, tokens, alpha, eos_id, encoded=None, mask=None):
    """Normalised log-prob [n] of each sequence in tokens [n, len]: up to and
    including its first EOS, else over all len tokens."""
    tokens = np.asarray(tokens)
    logp = np.asarray(self.logp(tokens, encoded, mask))
    token_logp = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    is_eos = tokens == eos_id
    length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])
    keep = np.arange(tokens.shape[1])[None] < length[:, None]
    return (token_logp * keep).sum(1) / decoding.brevity_penalty(alpha, length)


@pytest.fixture(scope="module")
def small():
  return Tiny(vocab=50, seed=0)


@pytest.fixture(scope="module")
def toy():
  return Tiny(vocab=6, seed=1)


@pytest.fixture(scope="module")
def eos(small):
  """An EOS id that greedy decoding of row 0 emits at step 2, so EOS paths run."""
  return int(small.run("greedy_decode", max_length=LENGTH, eos_id=NO_EOS)[0, 2])


def _assert_padded_after_eos(tokens, eos_id):
  tokens = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1])
  assert (tokens == eos_id).any()  # else the check below is vacuous
  for row in tokens:
    if eos_id in row:
      assert (row[list(row).index(eos_id) + 1 :] == 0).all(), row


def _expand(x, n):
  return jnp.repeat(x, n, axis=0)


def test_greedy_equals_argmax_of_uncached_forward(small):
  ours = small.run("greedy_decode", max_length=LENGTH, eos_id=NO_EOS)
  prefix = np.zeros((2, LENGTH), np.int32)  # causal: zeros past step t do not matter
  for t in range(LENGTH):
    prefix[:, t] = np.asarray(small.logp(prefix))[:, t].argmax(-1)
  np.testing.assert_array_equal(ours, prefix)


def test_sampling_at_temperature_zero_or_top1_is_greedy(small, eos):
  greedy = small.run("greedy_decode", max_length=LENGTH, eos_id=eos)
  rng = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(
      small.run("sample_decode", max_length=LENGTH, rng=rng, temperature=0.0, eos_id=eos), greedy
  )
  np.testing.assert_array_equal(
      small.run("sample_decode", max_length=LENGTH, rng=rng, temperature=2.0, topk=1, eos_id=eos),
      greedy,
  )


@pytest.mark.parametrize("temperature,topk", [(0.7, 0), (1.5, 5)])
def test_sampling_is_deterministic_and_first_token_matches_softmax(small, temperature, topk):
  n = 4000  # row 0 repeated: n independent draws of the first token
  draw = lambda seed: np.asarray(
      small.run(
          "sample_decode",
          _expand(small.encoded[:1], n),
          _expand(small.mask[:1], n),
          max_length=1,
          rng=jax.random.PRNGKey(seed),
          temperature=temperature,
          topk=topk,
      )
  )[:, 0]
  tokens = draw(11)
  np.testing.assert_array_equal(tokens, draw(11))
  assert (tokens != draw(12)).any()

  logits = np.asarray(small.logp(np.zeros((2, LENGTH)))[0, 0], np.float64) / temperature
  if topk:
    logits[np.argsort(logits)[:-topk]] = -np.inf
  p = np.exp(logits - logits.max())
  p /= p.sum()
  freq = np.bincount(tokens, minlength=p.size) / n
  sigma = np.sqrt(p * (1 - p) / n)
  np.testing.assert_array_less(np.abs(freq - p), 5 * sigma + 1e-3)
  assert freq[p == 0].sum() == 0


def test_beam_size_one_is_greedy(small, eos):
  greedy = small.run("greedy_decode", max_length=LENGTH, eos_id=NO_EOS)
  tokens, _ = small.run("beam_search", max_length=LENGTH, beam_size=1, eos_id=NO_EOS)
  np.testing.assert_array_equal(tokens[:, 0], greedy)
  # With an EOS and alpha 0 (no length bonus to wait for) beam 1 stops where greedy does.
  greedy = small.run("greedy_decode", max_length=LENGTH, eos_id=eos)
  tokens, _ = small.run("beam_search", max_length=LENGTH, beam_size=1, alpha=0.0, eos_id=eos)
  np.testing.assert_array_equal(tokens[:, 0], greedy)


def test_beam_scores_are_sorted_exact_and_beat_greedy(small, eos):
  tokens, scores = small.run("beam_search", max_length=LENGTH, beam_size=3, alpha=0.6, eos_id=eos)
  assert tokens.shape == (2, 3, LENGTH) and scores.shape == (2, 3)
  assert (np.diff(np.asarray(scores), axis=1) <= 0).all()
  # Each score is its sequence's normalised log-prob under the uncached forward.
  recomputed = small.scores(
      tokens.reshape(6, LENGTH), 0.6, eos, _expand(small.encoded, 3), _expand(small.mask, 3)
  )
  np.testing.assert_allclose(scores, recomputed.reshape(2, 3), rtol=1e-5, atol=1e-5)
  greedy = small.run("greedy_decode", max_length=LENGTH, eos_id=eos)
  assert (np.asarray(scores[:, 0]) >= small.scores(greedy, 0.6, eos) - 1e-5).all()


def _reference_beam_search(tiny, length, k, alpha, eos_id):
  """The same search without the cache or the early exit: numpy over the full forward,
  all `length` steps. top_k and a stable argsort break ties alike (lower index first)."""
  b, vocab = tiny.encoded.shape[0], tiny.model.config.vocab_size
  encoded, mask = _expand(tiny.encoded, k), _expand(tiny.mask, k)
  take = lambda x, idx: x[np.arange(b)[:, None], idx]
  top = lambda x, n: np.argsort(-x, axis=1, kind="stable")[:, :n]
  live = np.zeros((b, k, length), np.int64)
  live_logp = np.full((b, k), -np.inf)
  live_logp[:, 0] = 0.0
  done, done_scores = np.zeros((b, k, length), np.int64), np.full((b, k), -np.inf)
  for i in range(length):
    logp = np.asarray(tiny.logp(live.reshape(b * k, length), encoded, mask))[:, i]
    cand = (live_logp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, -1)
    idx = top(cand, 2 * k)
    cand_logp, token = take(cand, idx), idx % vocab
    seqs = take(live, idx // vocab)
    seqs[:, :, i] = token
    ended = (token == eos_id) | (i + 1 == length)
    scores = np.where(ended, cand_logp / decoding.brevity_penalty(alpha, i + 1), -np.inf)
    all_scores = np.concatenate([done_scores, scores], 1)
    best = top(all_scores, k)
    done, done_scores = take(np.concatenate([done, seqs], 1), best), take(all_scores, best)
    alive = top(np.where(ended, -np.inf, cand_logp), k)
    live, live_logp = take(seqs, alive), take(np.where(ended, -np.inf, cand_logp), alive)
  return done, done_scores


@pytest.mark.parametrize(
    "model,alpha,eos_id",
    [
        ("small", 0.6, None),
        ("toy", 2.0, 2),  # a strong length bonus: exiting on an unnormalised bound fails here
    ],
)
def test_beam_search_equals_uncached_reference_without_early_exit(request, model, alpha, eos_id):
  tiny = request.getfixturevalue(model)
  eos_id = request.getfixturevalue("eos") if eos_id is None else eos_id
  tokens, scores = tiny.run(
      "beam_search", max_length=LENGTH, beam_size=3, alpha=alpha, eos_id=eos_id
  )
  ref_tokens, ref_scores = _reference_beam_search(tiny, LENGTH, 3, alpha, eos_id)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eos_id", [NO_EOS, decoding.EOS_ID])
def test_beam_search_equals_exhaustive_search(toy, eos_id):
  """vocab 6, length 3: a beam of 6 ** 2 keeps every prefix, so the search is exact."""
  vocab, length, beam, alpha = 6, 3, 36, 0.6
  tokens, scores = toy.run(
      "beam_search", max_length=length, beam_size=beam, alpha=alpha, eos_id=eos_id
  )
  every = np.array(list(itertools.product(range(vocab), repeat=length)))
  if eos_id != NO_EOS:  # one spelling per sequence: nothing but padding after EOS
    first = np.where((every == eos_id).any(1), (every == eos_id).argmax(1), length)
    every = every[[(row[f + 1 :] == 0).all() for row, f in zip(every, first)]]
  for r in range(2):
    all_scores = toy.scores(
        every,
        alpha,
        eos_id,
        _expand(toy.encoded[r : r + 1], len(every)),
        _expand(toy.mask[r : r + 1], len(every)),
    )
    best = np.argsort(-all_scores)[:beam]
    np.testing.assert_allclose(scores[r], all_scores[best], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tokens[r], every[best])


def test_tokens_after_eos_are_padding(small, eos):
  _assert_padded_after_eos(small.run("greedy_decode", max_length=LENGTH, eos_id=eos), eos)
  _assert_padded_after_eos(
      small.run("beam_search", max_length=LENGTH, beam_size=3, alpha=0.6, eos_id=eos)[0], eos
  )
  sampled = small.run(
      "sample_decode",
      _expand(small.encoded, 8),
      _expand(small.mask, 8),
      max_length=LENGTH,
      rng=jax.random.PRNGKey(0),
      temperature=0.5,
      eos_id=eos,
  )
  _assert_padded_after_eos(sampled, eos)


def test_rejects_bad_settings(small):
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    decoding.sample_decode(
        small.model,
        small.params,
        small.encoded,
        small.mask,
        2,
        jax.random.PRNGKey(0),
        temperature=-1.0,
    )
  with pytest.raises(ValueError, match="topk must be in"):
    decoding.sample_decode(
        small.model, small.params, small.encoded, small.mask, 2, jax.random.PRNGKey(0), topk=51
    )
  with pytest.raises(ValueError, match="beam_size >= 1"):
    decoding.beam_search(small.model, small.params, small.encoded, small.mask, 2, beam_size=0)
