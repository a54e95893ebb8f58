"""Variable-rate memory: keep the memory tokens that carry information, drop the rest.

A passage of n real tokens keeps ceil(budget * n) of them (`TokenPruning.budget`, gin): the
real tokens of highest importance, in their original order, with their original positions
(the live encoder's relative attention still sees where they were). The budget is a share of
the passage's real tokens, not of its Lp slots: padding is not memory, and a budget of slots
would let short passages keep everything while long ones lose most of theirs (and would
count the padding it drops as compression). The memory array has M = ceil(budget * Lp) slots,
what a full passage keeps; the slots past a passage's kept count are masked. Importance
(`TokenPruning.method`):

  'first'    the first tokens (LUMEN-Light's choice, as a share of the passage);
  'random'   a fixed pseudo-random draw per (token, position): the same passage keeps the
             same tokens whether computed on the fly or precomputed;
  'learned'  a keep-score head (one Dense on the memory encoder output) trained end to end
             by a straight-through top-k: the forward keeps the top M exactly, and a kept
             token's vector is multiplied by 1 + (s - sg(s)) with s = sigmoid(score), so its
             score gets the gradient of scaling it up or down (a token that hurts is pushed
             out, the next candidate takes its place). Only kept tokens get a gradient: the
             estimator is biased towards the tokens kept now, which the budget's boundary
             keeps rotating;
  'vq_lm'    VQ-LM's score: a small classifier head reads the token's identity back from its
             *quantized* memory vector (stop-gradient: the head does not shape the memory);
             its cross-entropy is the importance (a token its quantized vector and context
             already tell is cheap to drop). The head trains with `head_loss_weight`.

`position_prior` adds -prior * position / Lp to every score (early tokens first, as in
text, where a passage's subject comes first). budget 1.0 keeps every real token: the reader
is then exactly the unpruned one.
"""

import dataclasses

import flax
import flax.linen as nn
from flax import traverse_util
import gin
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

METHODS = ("first", "random", "learned", "vq_lm")
LOSS_NAME = "token_pruning_loss"  # What the vq_lm head sows for the model's loss.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenPruning:
  """Which memory tokens a reader keeps (module docstring); `ReaderConfig.token_pruning`."""

  method: str = "learned"
  budget: float = 0.5
  position_prior: float = 0.0
  head_loss_weight: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"TokenPruning.method={self.method!r}: expected one of {METHODS}")
    if not 0.0 < self.budget <= 1.0:
      raise ValueError(
          f"TokenPruning.budget={self.budget}: the kept fraction of memory tokens must be in "
          "(0, 1]"
      )
    if self.head_loss_weight < 0:
      raise ValueError(f"TokenPruning.head_loss_weight={self.head_loss_weight}: must be >= 0")

  def kept_length(self, passage_length: int) -> int:
    """M: the memory slots per passage, what a passage of `passage_length` real tokens keeps."""
    return int(self.kept_tokens(passage_length))

  def kept_tokens(self, real_tokens):
    """Tokens kept of passages with `real_tokens` real tokens (int or array): ceil(budget n),
    at least one of a non-empty passage. Computed on the host, so the model (a table of it
    indexed by the real count) and the byte accounting agree to the token."""
    n = np.asarray(real_tokens, np.int64)
    k = np.ceil(self.budget * n - 1e-9).astype(np.int64)
    return np.where(n > 0, np.maximum(k, 1), 0)

  def as_fingerprint(self) -> dict:
    return dataclasses.asdict(self)


@flax.struct.dataclass
class Kept:
  """Indices [..., M] of the kept tokens (ascending), their mask [..., M], and the
  straight-through term [..., M] of their vectors (exactly 0 in the forward, see `apply`)."""

  index: jax.Array
  mask: jax.Array
  straight_through: jax.Array


def _hash_scores(tokens, positions):
  """A fixed pseudo-random score per (token, position) in [0, 1): integer hashing so it is
  the same on every backend and for every batch layout."""
  h = tokens.astype(jnp.uint32) * jnp.uint32(2654435761) + positions.astype(
      jnp.uint32
  ) * jnp.uint32(40503)
  h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
  h = h ^ (h >> 13)
  return (h >> 8).astype(jnp.float32) / float(1 << 24)


def select(scores, mask, kept_length: int, keep=None) -> tuple:
  """(indices [..., M], their mask [..., M]): the `keep` [...] (default: M) highest-scoring
  real tokens of each passage, ascending, first; then the other slots (masked), padding and
  real tokens past the passage's `keep`."""
  ranked = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
  _, index = lax.top_k(ranked, kept_length)  # Best first.
  kept = take(mask, index)
  if keep is not None:
    kept &= jnp.arange(kept_length) < keep[..., None]
  lp = mask.shape[-1]
  key = jnp.sort(jnp.where(kept, index, lp + index), axis=-1)  # The kept ones first, in order.
  return key % lp, key < lp


def take(x, index):
  """x [..., L, ...] at `index` [..., M] along the length axis (axis index.ndim - 1)."""
  axis = index.ndim - 1
  index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
  return jnp.take_along_axis(x, index, axis=axis)


class TokenImportance(nn.Module):
  """Scores and keeps a passage's memory tokens (module docstring).

  Parameters: `keep_score` (learned) or `vq_lm_head` (vq_lm); none for first and random.
  """

  pruning: TokenPruning
  passage_length: int
  vocab_size: int

  @nn.compact
  def __call__(self, vectors, quantized, tokens, mask) -> Kept:
    """vectors [..., Lp, d] (memory encoder output), quantized [..., Lp, d] (what is stored:
    the quantized vectors for LUMEN-VQ, else `vectors`), tokens and mask [..., Lp]."""
    p, lp = self.pruning, self.passage_length
    positions = jnp.broadcast_to(jnp.arange(lp), mask.shape)
    logit = None
    if p.method == "first":
      scores = -positions.astype(jnp.float32)
    elif p.method == "random":
      scores = _hash_scores(tokens, positions)
    elif p.method == "learned":
      logit = nn.Dense(1, dtype=jnp.float32, name="keep_score")(vectors.astype(jnp.float32))
      logit = logit[..., 0]
      scores = logit
    else:
      head = nn.Dense(self.vocab_size, dtype=jnp.float32, name="vq_lm_head")
      logits = head(lax.stop_gradient(quantized).astype(jnp.float32))
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
      weights = mask.astype(jnp.float32)
      self.sow(
          "intermediates",
          LOSS_NAME,
          {"sum": jnp.sum(ce * weights), "tokens": jnp.sum(weights)},
      )
      scores = lax.stop_gradient(ce)
    scores = scores - p.position_prior * positions.astype(jnp.float32) / lp
    keep = jnp.asarray(p.kept_tokens(np.arange(lp + 1)), jnp.int32)[jnp.sum(mask, axis=-1)]
    index, kept_mask = select(scores, mask, p.kept_length(lp), keep)
    if logit is None:
      straight_through = jnp.zeros(index.shape, jnp.float32)
    else:
      s = jax.nn.sigmoid(take(logit, index))
      straight_through = s - lax.stop_gradient(s)  # Exactly 0 in the forward; d/ds = 1.
    return Kept(index, kept_mask, straight_through)


def apply(x, kept: Kept):
  """The kept rows of x [..., Lp, d] ([..., M, d]); a float x gets the straight-through
  term: x + (s - sg(s)) x has x's values and the learned score's gradient."""
  x = take(x, kept.index)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return (
      x
      + kept.straight_through.reshape(
          kept.straight_through.shape + (1,) * (x.ndim - kept.index.ndim)
      ).astype(x.dtype)
      * x
  )


def loss_terms(intermediates, weight, head_loss_weight: float):
  """(loss term, metric sums) of the vq_lm head: its mean cross-entropy over real memory
  tokens, x the loss weight (the trainer divides sums by the total weight); (None, {})
  when nothing was sown."""
  flat = traverse_util.flatten_dict(dict(intermediates)) if intermediates else {}
  sown = [t for path, ts in flat.items() if path[-1] == LOSS_NAME for t in ts]
  if not sown:
    return None, {}
  (terms,) = sown  # One memory computation per forward.
  mean = terms["sum"] / jnp.maximum(terms["tokens"], 1.0)
  return head_loss_weight * mean * weight, {"token_pruning/vq_lm_loss": mean * weight}
