"""Stored memory in the reader: a tiny LUMEN-VQ reader's codes written to a real store, then
read back by the 'host' reader and the device-resident table ('device') in eval, predict,
train and the eval / infer CLIs, equal to computing memory on the fly ('compute'); stores
of another checkpoint or quantizer refused by field; out-of-range ids named; gin."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from lumenvq import eval as eval_cli, infer as infer_cli
from lumenvq.data import copy_task, passage_copy_task
from lumenvq.memory import memory_feed, memory_store, store_fingerprint
from lumenvq.model import reader_models, readers, stored_memory
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.training import checkpoints, evaluation, input_pipeline, optimizers, partitioning, trainer

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
READER = ReaderConfig(
    architecture="lumen_vq",
    num_passages=3,
    passage_length=8,
    codebook_size=16,
    subspace_dim=8,
    ema_decay=0.9,
)
LENGTHS = {"inputs": 8, "targets": 8}
K, LP, G, BATCH, STEP = 3, 8, 4, 8, 7
RULES = partitioning.standard_logical_axis_rules()
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TASK = "lumenvq_debug_passage_copy"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class IdSource(passage_copy_task.PassageCopySource):
  """The debug passage task with a corpus: passage j of validation example i is passage id
  K * i + j, so examples carry passage_ids (-1 padded) beside their passage tokens."""

  def example(self, split, index):
    ex = super().example(split, index)
    ids = [K * index + j for j in range(len(ex["passage_tokens"]))]
    ex["passage_ids"] = np.array(ids + [-1] * (K - len(ids)), np.int32)
    return ex


def _corpus():
  """[N, LP] tokens of every passage id of the validation split, cut as the converter cuts."""
  source = IdSource(TASK, LENGTHS)
  n = K * copy_task.SPLIT_SIZES["validation"]
  tokens = np.zeros((n, LP), np.int32)
  for ex in source.examples("validation"):
    for passage_id, passage in zip(ex["passage_ids"], ex["passage_tokens"]):
      tokens[passage_id, : min(LP, len(passage))] = passage[:LP]
  return tokens


def _model(reader="compute", path=None, **memory):
  source = stored_memory.MemorySource(reader, path, **memory)
  return reader_models.ReaderModel(CONFIG, READER, memory=source)


def _mesh(shape=(4, 2)):
  return partitioning.make_mesh(shape)


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(state, store path, compute trainer): random parameters and codebooks, and the store of
  the corpus' codes computed by the reader itself (checkpoint step STEP)."""
  model = _model()
  t = trainer.Trainer(
      model,
      optimizers.make_optimizer(schedule=optimizers.constant_schedule(0.01)),
      _mesh(),
      RULES,
      compiler_options=FAST_COMPILE,
  )
  state = t.init_state()
  quantizer = _host(state.model_state)
  codebooks = (
      np.random.default_rng(0)
      .normal(size=quantizer["quantizer"]["quantizer"]["codebooks"].shape)
      .astype(np.float32)
  )
  quantizer["quantizer"]["quantizer"]["codebooks"] = codebooks
  state = state.replace(model_state=jax.device_put(quantizer, t.state_shardings.model_state))
  variables = {"params": state.params, **state.model_state}
  corpus = _corpus()
  with partitioning.axis_rules_and_mesh(t.mesh, RULES):
    memory = jax.jit(
        lambda v, tokens: model.module.apply(
            v, tokens, return_codes=True, method=readers.Reader.compute_memory
        )
    )(variables, corpus)
  codes = np.asarray(memory.codes)
  assert codes.shape == (len(corpus), LP, G) and codes.dtype == np.uint8
  path = str(tmp_path_factory.mktemp("store") / "codes")
  store = memory_store.MemoryStore.create(
      path,
      kind="codes",
      num_passages=len(corpus),
      passage_length=LP,
      width=G,
      dtype=np.uint8,
      fingerprint=store_fingerprint.fingerprint_for(model, STEP, None, None),
      codebooks=np.asarray(readers.export_codebooks(variables)),
      shard_passages=64,
  )
  lengths = np.sum(corpus > 0, axis=-1)
  for shard in range(store.num_shards):
    start, stop = store.shard_range(shard)
    store.write_shard(shard, codes[start:stop], lengths[start:stop])
  store.finalize()
  return state, path, t


def _attached(model):
  t = trainer.Trainer(model, None, _mesh(), RULES, compiler_options=FAST_COMPILE)
  return t, memory_feed.attach(t, STEP)


@pytest.fixture(scope="module")
def compute_predictions(world):
  state, _, t = world
  return evaluation.predictions(
      t, state, IdSource(TASK, LENGTHS), "validation", BATCH, max_examples=16
  )


@pytest.mark.parametrize("reader", ["device", "host"])
def test_stored_memory_predicts_and_evaluates_as_computed_memory(
    world, compute_predictions, reader
):
  state, path, _ = world
  t, feed = _attached(_model(reader, path))
  constants = feed.step_constants
  assert set(constants) == ({"codebooks", "table"} if reader == "device" else {"codebooks"})
  # Codes mean what the store's codebooks say, whatever the model state holds now.
  state = state.replace(model_state=jax.tree_util.tree_map(jax.numpy.zeros_like, state.model_state))
  pairs, sums = evaluation.predictions(
      t, state, IdSource(TASK, LENGTHS), "validation", BATCH, max_examples=16, prepare=feed.prepare
  )
  want_pairs, want_sums = compute_predictions
  assert [text for _, text in pairs] == [text for _, text in want_pairs]
  assert float(sums["weight"]) == float(want_sums["weight"]) > 0
  assert float(sums["tokens"]) == float(want_sums["tokens"])  # Memory tokens = passage tokens.
  assert float(sums["correct"]) == float(want_sums["correct"])
  np.testing.assert_allclose(float(sums["loss"]), float(want_sums["loss"]), rtol=1e-5)


def test_device_table_trains_on_frozen_memory_in_microbatches(world):
  """The step constants reach every microbatch; the first step's loss is the computed
  memory's; the model's codebooks stay (the quantizer is not run)."""
  state, path, compute = world
  model = _model("device", path)
  t = trainer.Trainer(
      model,
      optimizers.make_optimizer(schedule=optimizers.constant_schedule(0.01)),
      _mesh(),
      RULES,
      num_microbatches=2,
      compiler_options=FAST_COMPILE,
  )
  feed = memory_feed.attach(t, STEP)
  source = IdSource(TASK, LENGTHS)
  layout = input_pipeline.data_layout(t.mesh, BATCH)
  stream = feed.wrap(
      input_pipeline.train_batches(
          source, model.feature_converter(LENGTHS), layout, 0, split="validation"
      )
  )
  batch = input_pipeline.to_global(next(stream), t.mesh, BATCH)
  assert "passage_tokens" not in batch and batch["passage_ids"].shape == (BATCH, K)
  tokens_batch = input_pipeline.to_global(
      next(
          input_pipeline.train_batches(
              source, compute.model.feature_converter(LENGTHS), layout, 0, split="validation"
          )
      ),
      t.mesh,
      BATCH,
  )
  want = compute.eval_step(state, tokens_batch)
  codebooks = _host(state.model_state)
  start = jax.tree_util.tree_map(lambda x: x.copy(), state)  # Steps donate their state.
  losses = []
  for _ in range(3):
    start, metrics = t.train_step(start, batch)
    losses.append(float(metrics["loss"]) / float(metrics["weight"]))
    assert metrics["finite"]
  np.testing.assert_allclose(losses[0] * float(metrics["weight"]), float(want["loss"]), rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, _host(start.model_state), codebooks)


def test_eval_and_infer_clis_read_the_store(world, compute_predictions, tmp_path):
  state, path, _ = world
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(STEP, state.replace(step=jax.numpy.asarray(STEP, jax.numpy.int32)))
  ckpt.wait()
  ckpt.close()
  source_fn = lambda task_feature_lengths: IdSource(TASK, task_feature_lengths)
  common = dict(
      model_dir=str(tmp_path),
      batch_size=BATCH,
      task_feature_lengths=LENGTHS,
      source_fn=source_fn,
      max_examples=16,
  )
  with gin.unlock_config():
    gin.bind_parameter("Trainer.compiler_options", FAST_COMPILE)
  try:
    (written,) = infer_cli.infer(model=_model("device", path), **common)
    metrics = eval_cli.evaluate(model=_model("host", path), **common)
  finally:
    gin.clear_config()
  with open(written) as f:
    records = [json.loads(line) for line in f]
  assert os.path.basename(written) == f"{TASK}-validation-{STEP}.jsonl"
  assert [r["prediction"] for r in records] == [text for _, text in compute_predictions[0]]
  want_sums = compute_predictions[1]
  np.testing.assert_allclose(
      metrics["loss"], float(want_sums["loss"]) / float(want_sums["weight"]), rtol=1e-5
  )
  assert metrics["examples"] == 16
  assert os.path.exists(tmp_path / "eval" / f"metrics_{STEP}.json")


def test_lumen_vectors_stored_in_bfloat16_evaluate_as_computed_memory(tmp_path):
  reader = ReaderConfig(**{**READER.__dict__, "architecture": "lumen"})
  compute = reader_models.ReaderModel(CONFIG, reader)
  t = trainer.Trainer(
      compute, optimizers.make_optimizer(), _mesh((2, 4)), RULES, compiler_options=FAST_COMPILE
  )
  state = t.init_state()
  corpus = _corpus()
  with partitioning.axis_rules_and_mesh(t.mesh, RULES):
    memory = jax.jit(
        lambda v, tokens: compute.module.apply(v, tokens, method=readers.Reader.compute_memory)
    )({"params": state.params}, corpus)
  vectors = np.where(np.asarray(memory.mask)[..., None], np.asarray(memory.vectors), 0)
  path = str(tmp_path / "vectors")
  store = memory_store.MemoryStore.create(
      path,
      kind="vectors",
      num_passages=len(corpus),
      passage_length=LP,
      width=CONFIG.emb_dim,
      dtype="bfloat16",
      fingerprint=store_fingerprint.fingerprint_for(compute, STEP, None, None),
  )
  store.write_shard(0, vectors.astype(jax.numpy.bfloat16), np.sum(corpus > 0, axis=-1))
  store.finalize()
  model = reader_models.ReaderModel(
      CONFIG, reader, memory=stored_memory.MemorySource("device", path)
  )
  stored = trainer.Trainer(model, None, t.mesh, RULES, compiler_options=FAST_COMPILE)
  feed = memory_feed.attach(stored, STEP)
  assert set(feed.step_constants) == {"table"}  # Vectors need no codebooks.
  examples = [IdSource(TASK, LENGTHS).example("validation", i) for i in range(BATCH)]
  want = t.eval_step(
      state, input_pipeline.to_global(compute.feature_converter(LENGTHS)(examples), t.mesh, BATCH)
  )
  got = stored.eval_step(
      state,
      input_pipeline.to_global(
          feed.prepare(model.feature_converter(LENGTHS)(examples)), t.mesh, BATCH
      ),
  )
  assert float(got["weight"]) == float(want["weight"])
  assert float(got["tokens"]) == float(want["tokens"])
  # bf16 memory moves this loss by ~1e-6 relative; other passages' memory by ~3e-3.
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-4)


def test_a_store_of_another_checkpoint_or_quantizer_is_refused_by_field(world):
  _, path, _ = world
  mesh = _mesh()
  with pytest.raises(
      memory_store.StoreError,
      match=r"fingerprint field 'checkpoint_step': store has 7, model has 8",
  ):
    memory_feed.open_feed(_model("device", path), mesh, RULES, checkpoint_step=8)
  other = reader_models.ReaderModel(
      CONFIG,
      ReaderConfig(**{**READER.__dict__, "codebook_size": 32}),
      memory=stored_memory.MemorySource("host", path),
  )
  with pytest.raises(memory_store.StoreError, match=r"fingerprint field 'quantizer'"):
    memory_feed.open_feed(other, mesh, RULES)  # Training: the step is not compared.
  # MemorySource.checkpoint_step names the store's step for a later checkpoint.
  feed = memory_feed.open_feed(_model("host", path, checkpoint_step=STEP), mesh, RULES, 9)
  assert feed.store.fingerprint["checkpoint_step"] == STEP


@pytest.mark.parametrize("reader", ["device", "host"])
def test_a_passage_id_past_the_store_is_named_before_the_step(world, reader):
  _, path, _ = world
  model = _model(reader, path)
  feed = memory_feed.open_feed(model, _mesh(), RULES, STEP)
  examples = [IdSource(TASK, LENGTHS).example("validation", 0), None]
  n = feed.store.num_passages
  examples[0]["passage_ids"] = np.array([3, n, -1], np.int32)
  with pytest.raises(ValueError, match=rf"passage id {n} is out of range"):
    feed.prepare(model.feature_converter(LENGTHS)(examples))


def test_converter_passes_passage_ids_instead_of_tokens():
  convert = _model("device", "/unused").feature_converter(LENGTHS)
  batch = convert(
      [
          {"inputs": [5, 1], "targets": [7, 1], "passage_ids": [4, 9, 2, 8]},
          {"inputs": [6, 1], "targets": [1], "passage_ids": np.array([3, -1])},
          None,
      ]
  )
  assert set(batch) == set(reader_models.ReaderFeatureConverter.ID_FEATURES)
  np.testing.assert_array_equal(batch["passage_ids"], [[4, 9, 2], [3, -1, -1], [-1, -1, -1]])
  assert batch["passage_ids"].dtype == np.int32
  with pytest.raises(ValueError, match=r"example 0 of the batch has no 'passage_ids'"):
    convert([{"inputs": [5], "targets": [1], "passage_tokens": [[3]]}])


def test_settings_are_checked():
  with pytest.raises(ValueError, match=r"MemorySource.reader='disk'"):
    stored_memory.MemorySource("disk", "/s")
  with pytest.raises(
      ValueError,
      match=r"MemorySource.reader='device' reads a memory store: " r"set MemorySource.path",
  ):
    stored_memory.MemorySource("device")
  with pytest.raises(ValueError, match=r"ReaderConfig.architecture='fid': fid has no memory"):
    reader_models.ReaderModel(
        CONFIG, ReaderConfig(architecture="fid"), memory=stored_memory.MemorySource("host", "/s")
    )


def test_gin_file_chooses_the_reader():
  try:
    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings(
        [
            os.path.join(REPO, f)
            for f in (
                "gin_configs/runs/eval.gin",
                "gin_configs/models/tiny.gin",
                "gin_configs/architectures/lumen_vq.gin",
                "gin_configs/runs/stored_memory.gin",
            )
        ],
        ["MEMORY_STORE = '/stores/vq'", "MEMORY_READER = 'host'"],
        finalize_config=False,
    )
    model = gin.query_parameter("evaluate.model").scoped_configurable_fn()
    assert model.memory == stored_memory.MemorySource("host", "/stores/vq")
    assert model.feature_converter(LENGTHS).passage_ids
  finally:
    gin.clear_config()
