"""Token cross-entropy against a numpy reference, with smoothing and z-loss."""

import jax.numpy as jnp
import numpy as np

from lumenvq.model import losses


def _reference(logits, targets, smoothing, z_loss):
  vocab = logits.shape[-1]
  log_z = np.log(np.exp(logits).sum(-1))
  logp = logits - log_z[..., None]
  dist = np.full(logits.shape, smoothing / (vocab - 1))
  np.put_along_axis(dist, targets[..., None], 1 - smoothing, axis=-1)
  entropy = -(dist * np.log(np.where(dist > 0, dist, 1))).sum(-1)
  token = -(dist * logp).sum(-1) - entropy + z_loss * log_z**2
  weights = (targets > 0).astype(np.float64)
  return (token * weights).sum(), weights.sum()


def test_matches_reference():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 5, 11)
  targets = rng.randint(1, 11, (3, 5))
  targets[0, 3:] = 0
  for smoothing, z_loss in [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2)]:
    loss, _, weight = losses.cross_entropy_with_logits(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets),
        label_smoothing=smoothing,
        z_loss=z_loss,
    )
    ref_loss, ref_weight = _reference(logits, targets, smoothing, z_loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert weight == ref_weight == 13


def test_perfect_smoothed_prediction_has_zero_loss():
  smoothing, vocab = 0.1, 7
  dist = np.full((1, 1, vocab), smoothing / (vocab - 1))
  dist[0, 0, 3] = 1 - smoothing
  loss, _, _ = losses.cross_entropy_with_logits(
      jnp.log(jnp.asarray(dist, jnp.float32)), jnp.array([[3]]), label_smoothing=smoothing
  )
  assert abs(float(loss)) < 1e-5
