"""Checkpoints: save and restore onto another mesh, keep-N / every-N, shape
mismatches that name the parameter, restores that fall back to fresh parameters, the params layout shared with param_io,
SIGTERM handling and the MODEL_DIR writability check."""

import os
import signal

import jax
import numpy as np
import pytest

from lumenvq.model import models
from lumenvq.model.network_config import T5Config
from lumenvq.training import checkpoints, optimizers, param_io, partitioning, trainer

RULES = partitioning.standard_logical_axis_rules()


def _trainer(mesh_shape, **config):
  cfg = dict(
      vocab_size=64,
      emb_dim=32,
      num_heads=4,
      head_dim=8,
      mlp_dim=64,
      num_encoder_layers=1,
      num_decoder_layers=1,
      dtype="float32",
  )
  model = models.EncoderDecoderModel(T5Config(**{**cfg, **config}))
  return trainer.Trainer(
      model, optimizers.make_optimizer(), partitioning.make_mesh(mesh_shape), RULES
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A (8, 1)-mesh train state saved at step 5 (asynchronously) and the state itself."""
  directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  state = _trainer((8, 1)).init_state()
  ckpt = checkpoints.Checkpointer(directory, save_every=5, keep=2)
  ckpt.save(5, state)
  ckpt.wait()
  ckpt.close()
  return directory, jax.device_get(state)


def test_restore_onto_another_mesh(saved):
  directory, state = saved
  t = _trainer((2, 4))
  ckpt = checkpoints.Checkpointer(directory)
  assert ckpt.latest_step() == 5
  restored = ckpt.restore(t.abstract_state())
  ckpt.close()
  assert int(restored.step) == 5
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, jax.device_get(restored.params), state.params
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, jax.device_get(restored.opt_state), state.opt_state
  )
  kernel = restored.params["decoder"]["logits_dense"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "model": 4}
  assert kernel.sharding.shard_shape(kernel.shape) == (32, 16)


def test_params_item_is_a_param_io_directory(saved):
  directory, state = saved
  t = _trainer((8, 1))
  params = param_io.restore_params(
      os.path.join(directory, "5", "params"), t.abstract_state().params
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), state.params)


def test_parameters_the_checkpoint_lacks_start_fresh_only_when_asked(saved, tmp_path):
  """fallback_to_scratch: a network with a new parameter restores the rest."""
  directory, state = saved
  abstract = _trainer((8, 1)).abstract_state().params
  params = jax.device_get(state.params)
  flat = param_io.flat_names(params)
  dropped = "decoder/logits_dense/kernel"
  path = str(tmp_path / "params")
  param_io.save_params(path, param_io.unflat_names({k: v for k, v in flat.items() if k != dropped}))
  with pytest.raises(ValueError, match=f"parameter {dropped} is missing"):
    param_io.restore_params(path, abstract)
  fresh = jax.tree_util.tree_map(np.zeros_like, params)
  got = param_io.flat_names(jax.device_get(param_io.restore_params(path, abstract, fresh)))
  assert set(got) == set(flat) and not got[dropped].any()
  for name in flat.keys() - {dropped}:
    np.testing.assert_array_equal(got[name], flat[name])


def test_shape_mismatch_names_the_first_parameter(saved):
  directory, _ = saved
  ckpt = checkpoints.Checkpointer(directory)
  with pytest.raises(
      ValueError,
      match=r"parameter decoder/layers_0/mlp/wi_0/kernel has shape "
      r"\(32, 64\), the config expects \(32, 48\)",
  ):
    ckpt.restore(_trainer((8, 1), mlp_dim=48).abstract_state())
  ckpt.close()


def test_every_n_steps_and_keep_n(saved, tmp_path):
  _, state = saved
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=2, keep=2)
  assert [s for s in range(1, 7) if ckpt.should_save(s)] == [2, 4, 6]
  small = trainer.TrainState(
      step=0, params={"w": np.ones(3, np.float32)}, opt_state={"count": np.zeros((), np.int32)}
  )
  for step in (2, 4, 6):
    ckpt.save(step, small)
  ckpt.wait()
  assert list(ckpt.manager.all_steps()) == [4, 6]
  # A save that never finished (killed process) is not a checkpoint.
  os.makedirs(tmp_path / "8.orbax-checkpoint-tmp-123")
  ckpt.close()
  reopened = checkpoints.Checkpointer(str(tmp_path), save_every=2, keep=2)
  assert reopened.latest_step() == 6
  reopened.close()


def test_sigterm_sets_the_preemption_flag_and_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  watcher = checkpoints.PreemptionWatcher()
  assert not watcher.reached(3)
  os.kill(os.getpid(), signal.SIGTERM)
  assert watcher.reached(4)
  watcher.close()
  assert signal.getsignal(signal.SIGTERM) == before


def test_unwritable_model_dir_names_the_path(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(checkpoints.CheckpointError, match=f"MODEL_DIR {blocker}/model is not"):
    checkpoints.check_writable(str(blocker / "model"))
  assert checkpoints.check_writable(str(tmp_path / "new" / "dir")).endswith("new/dir")
