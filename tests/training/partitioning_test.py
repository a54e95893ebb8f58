"""Forward and backward on 1 device and on 8 devices (meshes 4x2 and 2x4) agree;
meshes and dimensions that do not fit stop with the setting and the numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import losses, network
from lumenvq.model.network_config import T5Config
from lumenvq.training import partitioning

CONFIG = T5Config(
    vocab_size=64,
    emb_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    dtype="float32",
)


def _batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(1, 64, (8, 12)).astype(np.int32)
  enc[::3, 9:] = 0
  tgt = rng.randint(1, 64, (8, 6)).astype(np.int32)
  tgt[1::2, 4:] = 0
  dec_in = np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


def _loss_and_grads(mesh):
  """Jitted loss and gradients with parameter and batch shardings from the rules."""
  rules = partitioning.standard_logical_axis_rules()
  model = network.Transformer(CONFIG)
  boxed = network.init_variables(CONFIG, jax.random.PRNGKey(0))["params"]
  params = nn.meta.unbox(boxed)
  abstract = network.abstract_params(CONFIG)
  partitioning.check_divisible(abstract, mesh, rules)
  param_shardings = partitioning.logical_shardings(abstract, mesh, rules)
  batch = _batch()
  batch_sharding = partitioning.data_sharding(mesh, 2)

  def loss_fn(p, enc, dec_in, tgt):
    logits = model.apply({"params": p}, enc, dec_in, tgt)
    loss, _, weight = losses.cross_entropy_with_logits(logits, tgt)
    return loss / weight

  with partitioning.axis_rules_and_mesh(mesh, rules):
    step = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(param_shardings,) + (batch_sharding,) * 3,
        out_shardings=(None, param_shardings),
    )
    params = jax.device_put(params, param_shardings)
    batch = [jax.device_put(x, batch_sharding) for x in batch]
    loss, grads = step(params, *batch)
  return float(loss), jax.tree_util.tree_map(np.asarray, grads), grads


def test_mesh_shapes_give_same_loss_and_gradients():
  assert len(jax.devices()) == 8
  ref_loss, ref_grads, _ = _loss_and_grads(
      partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  )
  for shape in [(4, 2), (2, 4)]:
    loss, grads, sharded = _loss_and_grads(partitioning.make_mesh(shape))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, ref_grads
    )
    # The parameters really are split over the model axis.
    kernel = sharded["decoder"]["logits_dense"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (32, 64 // shape[1])


def test_mesh_must_match_device_count():
  with pytest.raises(
      partitioning.PartitioningError, match=r"MESH_SHAPE=\(4, 4\) needs 16 devices, but 8"
  ):
    partitioning.make_mesh((4, 4))
  with pytest.raises(partitioning.PartitioningError, match=r"MESH_SHAPE=\(3, -1\)"):
    partitioning.make_mesh((3, -1))
  assert dict(partitioning.make_mesh((-1, 2)).shape) == {"data": 4, "model": 2}


def test_dimension_not_divisible_names_parameter():
  config = T5Config(
      vocab_size=66,
      emb_dim=32,
      num_heads=4,
      head_dim=8,
      mlp_dim=64,
      num_encoder_layers=1,
      num_decoder_layers=1,
  )
  mesh = partitioning.make_mesh((2, 4))
  with pytest.raises(
      partitioning.PartitioningError,
      match=r"logits_dense/kernel has a dimension of 66 .* 'model' of size 4",
  ):
    partitioning.check_divisible(
        network.abstract_params(config), mesh, partitioning.standard_logical_axis_rules()
    )


def test_batch_must_divide_data_axis():
  with pytest.raises(partitioning.PartitioningError, match=r"BATCH_SIZE=6 .* 'data' of size 4"):
    partitioning.check_batch(6, partitioning.make_mesh((4, 2)))
