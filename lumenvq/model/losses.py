"""Token cross-entropy as T5X computes it: label smoothing, z-loss, per-token weights."""

import jax
import jax.numpy as jnp


def cross_entropy_with_logits(
    logits, targets, weights=None, *, label_smoothing: float = 0.0, z_loss: float = 0.0
):
  """Returns (sum of weighted token losses, sum of z-loss terms, sum of weights).

  `targets` are ids [b, l]; `weights` defaults to `targets > 0` (padding is 0).
  With smoothing the target distribution puts 1-s on the label and s/(V-1)
  elsewhere, and the loss subtracts that distribution's entropy so that a
  perfect prediction has loss 0 (as T5X does).
  """
  vocab = logits.shape[-1]
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizing = (
      -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
      if label_smoothing
      else 0.0
  )
  soft = low + (confidence - low) * jax.nn.one_hot(targets, vocab)
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  token_loss = log_z - jnp.sum(soft * logits, axis=-1) - normalizing
  z_term = z_loss * jnp.square(log_z)
  return (jnp.sum((token_loss + z_term) * weights), jnp.sum(z_term * weights), jnp.sum(weights))
