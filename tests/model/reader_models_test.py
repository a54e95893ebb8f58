"""ReaderModel in the trainer: the passage feature converter, LUMEN-VQ's codebooks as
model state (moved by train steps only, checkpointed, restored onto another mesh, never
seen by the optimizer), the frozen memory encoder, every architecture's train step,
prediction, and the gin files that pick the model."""

import functools
import os

import gin
import jax
import numpy as np
import pytest

from lumenvq import eval as eval_cli, train as train_cli  # pylint: disable=unused-import (gin)
from lumenvq.data import passage_copy_task
from lumenvq.model import models, reader_models
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.training import checkpoints, input_pipeline, optimizers, partitioning, trainer

CONFIG = T5Config(
    vocab_size=264,
    emb_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=2,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
LENGTHS = {"inputs": 8, "targets": 8}
K, LP, BATCH = 3, 8, 8
RULES = partitioning.standard_logical_axis_rules()
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # Compilation is most of the time.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(arch, **overrides):
  reader = dict(
      architecture=arch,
      num_passages=K,
      passage_length=LP,
      codebook_size=16,
      subspace_dim=8,
      ema_decay=0.9,
      light_length=LP // 2,
  )
  return reader_models.ReaderModel(CONFIG, ReaderConfig(**{**reader, **overrides}))


def _trainer(model, mesh_shape=(8, 1), optimizer=True, **kwargs):
  opt = (
      optimizers.make_optimizer(schedule=optimizers.constant_schedule(0.01)) if optimizer else None
  )
  mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[: np.prod(mesh_shape)])
  return trainer.Trainer(model, opt, mesh, RULES, compiler_options=FAST_COMPILE, **kwargs)


def _batch(model, mesh, index=0):
  source = passage_copy_task.PassageCopySource("lumenvq_debug_passage_copy", LENGTHS)
  layout = input_pipeline.data_layout(mesh, BATCH)
  stream = input_pipeline.train_batches(source, model.feature_converter(LENGTHS), layout, index)
  return input_pipeline.to_global(next(stream), mesh, BATCH)


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, _host(a), _host(b))


def _train(t, batch, steps, state=None):
  """(host copies of the states before each step and after the last, metrics per step)."""
  state = t.init_state() if state is None else state
  states, metrics = [], []
  for _ in range(steps):
    states.append(_host(state))
    state, m = t.train_step(state, batch)  # Donates `state`.
    metrics.append(_host(m))
  return state, states + [_host(state)], metrics


def test_converter_cuts_pads_and_keeps_the_t5_features():
  long = np.arange(10, 10 + LP + 3)
  examples = [
      {"inputs": [5, 1], "targets": [7, 8, 1], "passage_tokens": [long, [], [4, 4, 1]]},
      {
          "inputs": [6, 1],
          "targets": [9, 1],
          "passage_tokens": np.array([[3, 3, 1, 0], [0, 0, 0, 0], [2, 1, 0, 0], [8, 1, 0, 0]]),
      },
      {"inputs": [6, 6, 1], "targets": [1], "passage_tokens": [[2, 1]]},
      None,
  ]
  batch = reader_models.ReaderFeatureConverter(LENGTHS, K, LP)(examples)
  assert set(batch) == set(reader_models.ReaderFeatureConverter.FEATURES)
  assert batch["passage_tokens"].shape == (4, K, LP)
  assert batch["passage_tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["passage_tokens"][0, 0], long[:LP])  # Cut to Lp.
  np.testing.assert_array_equal(batch["passage_tokens"][0, 1], 0)  # Empty: absent.
  np.testing.assert_array_equal(batch["passage_tokens"][0, 2], [4, 4, 1, 0, 0, 0, 0, 0])
  # A [K', L] array: the all-zero row stays absent; passages beyond K are dropped.
  np.testing.assert_array_equal(
      batch["passage_tokens"][1, :, :4], [[3, 3, 1, 0], [0, 0, 0, 0], [2, 1, 0, 0]]
  )
  np.testing.assert_array_equal(batch["passage_tokens"][2, 1:], 0)  # Missing: zeros.
  np.testing.assert_array_equal(batch["passage_tokens"][3], 0)  # Padding row.
  plain = models.EncDecFeatureConverter(LENGTHS)(examples)
  np.testing.assert_array_equal(batch["question_tokens"], plain["encoder_input_tokens"])
  for name in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
    np.testing.assert_array_equal(batch[name], plain[name])
  convert = reader_models.ReaderFeatureConverter(LENGTHS, K, LP)
  with pytest.raises(ValueError, match=r"example 0 of the batch has no 'passage_tokens'"):
    convert([{"inputs": [5], "targets": [1]}])
  with pytest.raises(ValueError, match=r"passage 0 of example 0 has shape \(1, 2\)"):
    convert([{"inputs": [5], "targets": [1], "passage_tokens": [[[1, 2]]]}])
  with pytest.raises(ValueError, match=r"\['targets'\]=8"):
    convert([{"inputs": [5], "targets": [1] * 9, "passage_tokens": []}])


def test_debug_source_answers_from_the_first_passage():
  source = passage_copy_task.PassageCopySource("lumenvq_debug_passage_copy", LENGTHS)
  examples = list(source.examples("validation"))
  assert len(examples) == 64
  counts = {len(ex["passage_tokens"]) for ex in examples}
  assert counts == {K - 1, K}  # Some examples miss their last distractor.
  for ex in examples:
    first = source.decode(ex["passage_tokens"][0])
    key, value = first.split()[:2]
    assert (key, value) == (ex["inputs_pretokenized"], ex["targets_pretokenized"])
    others = [source.decode(p).split()[0] for p in ex["passage_tokens"][1:]]
    assert key not in others  # Only the first passage answers the question.
  assert max(len(p) for ex in examples for p in ex["passage_tokens"]) > LP  # Cut by Lp.
  assert (
      input_pipeline.get_source("lumenvq_debug_passage_copy", LENGTHS, backend="numpy").example(
          "train", 3
      )["targets_pretokenized"]
      == passage_copy_task.text_example("train", 3)["targets"]
  )
  with pytest.raises(ValueError, match=r"PassageCopySource serves only the debug tasks"):
    passage_copy_task.PassageCopySource("lumenvq_debug_copy", LENGTHS)


@pytest.fixture(scope="module")
def vq():
  """Four LUMEN-VQ train steps on one fixed batch (8x1 mesh)."""
  model = _model("lumen_vq")
  t = _trainer(model)
  batch = _batch(model, t.mesh)
  state, states, metrics = _train(t, batch, 4)
  return t, batch, state, states, metrics


def test_lumen_vq_steps_move_codebooks_and_lower_the_loss(vq):
  t, _, _, states, metrics = vq
  assert t.model.model_state_collections() == ("quantizer",)
  quantizer = [s.model_state["quantizer"]["quantizer"] for s in states]
  assert not quantizer[0]["initialized"] and not np.any(quantizer[0]["codebooks"])
  assert all(q["initialized"] for q in quantizer[1:])
  for before, after in zip(quantizer[1:], quantizer[2:]):  # Every step moves the EMA.
    assert not np.array_equal(before["codebooks"], after["codebooks"])
    assert not np.array_equal(before["ema_counts"], after["ema_counts"])
  losses = [m["loss"] / m["weight"] for m in metrics]
  assert losses[-1] < losses[0] - 0.1, losses
  for m in metrics:
    assert m["finite"]
    usage = m["quantizer/codebook_usage"] / m["weight"]
    perplexity = m["quantizer/perplexity"] / m["weight"]
    error = m["quantizer/relative_reconstruction_error"] / m["weight"]
    assert 0 < usage <= 1 and 1 < perplexity <= 16 and 0 < error < 1, m
  # The optimizer keeps state for parameters only: nothing of the quantizer collection.
  opt_paths = {
      jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(states[-1].opt_state)
  }
  assert opt_paths and not any("codebooks" in p or "ema_" in p for p in opt_paths)


def test_eval_and_predict_read_but_never_move_the_codebooks(vq):
  t, batch, state, states, _ = vq
  before = _host(state.model_state)
  sums = t.eval_step(state, batch)
  tokens = np.asarray(t.predict_batch(state, batch))
  _assert_equal(state.model_state, before)
  assert tokens.shape == (BATCH, LENGTHS["targets"]) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < CONFIG.vocab_size
  assert float(sums["weight"]) == float(np.sum(np.asarray(batch["decoder_loss_weights"])))
  # Eval reads the codebooks: the first step's codebooks give another loss.
  earlier = state.replace(
      model_state=jax.device_put(states[1].model_state, t.state_shardings.model_state)
  )
  assert float(t.eval_step(earlier, batch)["loss"]) != pytest.approx(float(sums["loss"]))
  with pytest.raises(ValueError, match=r"needs the model state collections \['quantizer'\]"):
    t.model.eval_fn(state.params, batch)


def test_checkpoint_restores_codebooks_exactly_onto_another_mesh(vq, tmp_path):
  t, _, state, _, _ = vq
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=4)
  ckpt.save(4, state)
  ckpt.wait()
  items = set(os.listdir(tmp_path / "checkpoints" / "4"))
  assert {"params", "opt_state", "model_state"} <= items
  other = _trainer(_model("lumen_vq"), (2, 4))
  restored = ckpt.restore(other.abstract_state())
  ckpt.close()
  _assert_equal(restored.model_state, state.model_state)
  _assert_equal(restored.params, state.params)
  _assert_equal(restored.opt_state, state.opt_state)
  codebooks = restored.model_state["quantizer"]["quantizer"]["codebooks"]
  assert codebooks.sharding.mesh.shape == {"data": 2, "model": 4}
  assert codebooks.sharding.shard_shape(codebooks.shape) == (1, 4, 4, 8)  # Codes / model.
  # Eval and infer restore params and codebooks without the optimizer state.
  inference = _trainer(_model("lumen_vq"), (2, 4), optimizer=False)
  loaded, step = checkpoints.load_state(inference.abstract_state(), str(tmp_path))
  assert step == 4 and loaded.opt_state is None
  _assert_equal(loaded.model_state, state.model_state)
  from_params_dir, _ = checkpoints.load_state(
      inference.abstract_state(), params_path=str(tmp_path / "checkpoints" / "4" / "params")
  )
  _assert_equal(from_params_dir.model_state, state.model_state)


def test_a_checkpoint_without_codebooks_does_not_restore_into_lumen_vq(vq, tmp_path):
  t, _, state, _, _ = vq
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, state.replace(model_state={}))  # What a LUMEN run writes.
  ckpt.wait()
  with pytest.raises(
      checkpoints.CheckpointError, match=r"checkpoints/1 has no model_state item: .*\['quantizer'\]"
  ):
    ckpt.restore(t.abstract_state())
  ckpt.close()
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r"CHECKPOINT_PATH=.* holds parameters " r"only.*\['quantizer'\]",
  ):
    checkpoints.load_state(
        t.abstract_state(), params_path=str(tmp_path / "checkpoints" / "1" / "params")
    )


def test_microbatches_pass_the_codebooks_on_in_order():
  """Microbatch 0 seeds the codebooks (EMA counts = its memory tokens); microbatch 1
  updates what microbatch 0 left: counts = d * tokens_0 + (1 - d) * tokens_1."""
  model = _model("lumen_vq", dead_code_threshold=0.0)  # No resets: counts stay exact.
  t = _trainer(model, (2, 1), num_microbatches=2)
  batch = _batch(model, t.mesh)
  state, metrics = t.train_step(t.init_state(), batch)
  tokens = np.sum(np.asarray(batch["passage_tokens"]) > 0, axis=(1, 2))
  first, second = tokens[0::2].sum(), tokens[1::2].sum()  # Rows i, i + M, ... (trainer).
  assert first != second
  counts = np.asarray(state.model_state["quantizer"]["quantizer"]["ema_counts"]).sum(-1)
  np.testing.assert_allclose(counts, 0.9 * first + 0.1 * second, rtol=1e-5)
  assert metrics["finite"] and float(metrics["quantizer/codebook_usage"]) > 0


def test_freeze_memory_encoder_keeps_its_layers_bit_identical():
  model = _model("lumen", freeze_memory_encoder=True)
  assert model.frozen_param_patterns() == (r"^encoder/layers_(0)/",)
  t = _trainer(model, (2, 1), optimizer=True)
  assert t.optimizer.frozen_patterns == model.frozen_param_patterns()  # Added by the trainer.
  _, states, metrics = _train(t, _batch(model, t.mesh), 2)
  first, last = states[0].params, states[-1].params
  _assert_equal(last["encoder"]["layers_0"], first["encoder"]["layers_0"])
  assert not np.array_equal(
      last["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
      first["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
  )
  assert not np.array_equal(
      last["decoder"]["logits_dense"]["kernel"], first["decoder"]["logits_dense"]["kernel"]
  )
  assert not np.array_equal(
      last["token_embedder"]["embedding"], first["token_embedder"]["embedding"]
  )
  assert all(m["finite"] for m in metrics) and states[-1].model_state == {}


@pytest.mark.parametrize("arch", ["fid", "lumen_light"])
def test_train_step_runs_without_model_state(arch):
  model = _model(arch)
  t = _trainer(model, (1, 1))
  _, states, metrics = _train(t, _batch(model, t.mesh), 1)
  assert t.model.model_state_collections() == () and states[-1].model_state == {}
  assert metrics[0]["finite"] and not any(k.startswith("quantizer/") for k in metrics[0])
  assert not np.array_equal(
      states[-1].params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
      states[0].params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
  )


def _parse(run, *files, bindings=()):
  """The model `run.model` (train, evaluate, infer) gets from these gin files."""
  gin.clear_config()
  gin.add_config_file_search_path(REPO)
  gin.parse_config_files_and_bindings(
      [os.path.join(REPO, f) for f in files], list(bindings), finalize_config=False
  )  # MODEL_DIR stays unset.
  return gin.query_parameter(f"{run}.model").scoped_configurable_fn()


@pytest.mark.parametrize("arch", ["fid", "lumen", "lumen_vq", "lumen_light"])
def test_architecture_gin_files_choose_the_model_for_every_run(arch):
  try:
    # The run file may come first or last; the architecture file follows the size file.
    for files in [
        (
            "gin_configs/runs/train.gin",
            "gin_configs/models/tiny.gin",
            f"gin_configs/architectures/{arch}.gin",
        ),
        (
            "gin_configs/models/tiny.gin",
            f"gin_configs/architectures/{arch}.gin",
            "gin_configs/debug/tiny_reader_train.gin",
        ),
    ]:
      model = _parse("train", *files, bindings=["EncoderDecoderModel.z_loss = 0.5"])
      assert type(model) is reader_models.ReaderModel
      assert model.reader.architecture == arch and model.config.emb_dim == 64
      assert model.z_loss == 0.5  # The run file's EncoderDecoderModel settings apply.
    assert model.reader.passage_length == 16 and model.config.vocab_size == 264
    evaluated = _parse(
        "evaluate",
        "gin_configs/runs/eval.gin",
        "gin_configs/models/tiny.gin",
        f"gin_configs/architectures/{arch}.gin",
    )
    assert type(evaluated) is reader_models.ReaderModel
    assert evaluated.reader.architecture == arch and evaluated.reader.passage_length == 256
    plain = _parse("evaluate", "gin_configs/runs/eval.gin", "gin_configs/debug/tiny_task.gin")
    assert type(plain) is models.EncoderDecoderModel
  finally:
    gin.clear_config()
