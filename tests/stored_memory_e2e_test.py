"""From the precompute job to predictions: a tiny LUMEN-VQ reader trained one step on a demo
task (its first step seeds the codebooks from memory vectors) and checkpointed;
`lumenvq.precompute_memory` writes its memory over the demo world's passage table; the
'host' and 'device' readers of that store, opened against the whole fingerprint (checkpoint
step, vocabulary, passage table), decode the task's dev questions to the same predictions,
loss and token accuracy as the memory computed from passage tokens ('compute'), and other
passages' memory gives another loss.

stored_memory_test checks the readers on a store written directly through MemoryStore and
precompute_memory_test the stored codes; here the two meet through real files.
"""

import dataclasses
import os

import gin
import jax
import numpy as np
import pytest

from lumenvq import eval as eval_lib
from lumenvq import precompute_memory
from lumenvq.data import demo, kilt, passages, retrieve, vocab
from lumenvq.data.passage_table import PassageTable
from lumenvq.memory import memory_feed
from lumenvq.memory.memory_store import StoreError
from lumenvq.model import reader_models, stored_memory
from lumenvq.model.token_pruning import TokenPruning
from lumenvq.training import checkpoints, evaluation, input_pipeline, optimizers, partitioning, trainer

TASK = "lumenvq_demo_nq"
K, LP, BATCH, STEP = 4, 32, 8, 1
LENGTHS = {"inputs": 32, "targets": 8}
BINDINGS = [
    f"ReaderConfig.num_passages = {K}",
    f"ReaderConfig.passage_length = {LP}",
    "ReaderConfig.codebook_size = 16",
]
FAST_COMPILE = {"xla_backend_optimization_level": 0}


GIN_FILES = ["gin_configs/models/tiny.gin", "gin_configs/architectures/lumen_vq.gin"]
# Variable-rate memory: half of each passage's tokens, chosen by a learned score; the store
# keeps their positions beside their codes.
PRUNED = [
    "ReaderConfig.token_pruning = @TokenPruning()",
    "TokenPruning.method = 'learned'",
    "TokenPruning.budget = 0.5",
]


@pytest.fixture(scope="module", params=["plain", "pruned"])
def world(request, tmp_path_factory, reader_from_gin):
  """The demo world's files where the demo tasks find them (LUMENVQ_DEMO_DIR), a checkpoint
  at STEP, and the store precompute_memory made from it."""
  root = tmp_path_factory.mktemp("e2e")
  data = str(root / "data")
  demo.write_demo(data, num_entities=100, train_size=BATCH, dev_size=12)
  source = os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(root / "passages"), words=12, progress=False)
  spm = vocab.train_sentencepiece(
      source, str(root / "vocab" / "spm"), vocab_size=400, max_sentences=None, threads=1
  )
  nq = kilt.get_task("nq")
  retrieve.run(
      str(root / "passages"),
      [os.path.join(data, nq.file(s)) for s in ("train", "dev")],
      str(root / "retrieval"),
      k=K,
      progress=False,
  )
  pruned = request.param == "pruned"
  # d = 64: G = 4 subspaces, C = 16 codes.
  model = reader_from_gin(GIN_FILES, BINDINGS + (PRUNED if pruned else []))
  with pytest.MonkeyPatch.context() as env:
    env.setenv("LUMENVQ_DEMO_DIR", data)
    with gin.unlock_config():
      gin.bind_parameter("Trainer.compiler_options", FAST_COMPILE)
    try:
      source = input_pipeline.SeqioSource(TASK, LENGTHS)
      t = trainer.Trainer(
          model,
          optimizers.make_optimizer(),
          partitioning.make_mesh(),
          partitioning.standard_logical_axis_rules(),
      )
      batch = next(
          input_pipeline.train_batches(
              source, model.feature_converter(LENGTHS), input_pipeline.data_layout(t.mesh, BATCH), 0
          )
      )
      state, _ = t.train_step(t.init_state(), input_pipeline.to_global(batch, t.mesh, BATCH))
      assert bool(state.model_state["quantizer"]["quantizer"]["initialized"])
      ckpt = checkpoints.Checkpointer(str(root / "model" / "checkpoints"))
      ckpt.save(STEP, state)
      ckpt.wait()
      ckpt.close()
      store = str(root / "store")
      precompute_memory.precompute(
          model_dir=str(root / "model"),
          model=model,
          store_path=store,
          passages_dir=str(root / "passages"),
          vocabulary_path=spm,
          batch_size=16,
          shard_passages=64,
          progress=False,
      )
      yield dict(
          mesh=t.mesh,
          rules=t.rules,
          model=model,
          source=source,
          model_dir=str(root / "model"),
          store=store,
          vocabulary=spm,
          passages=str(root / "passages"),
      )
    finally:
      gin.clear_config()


def _evaluate(world, reader, roll=0):
  """(predictions, metric sums, feed) of the dev split with memory from `reader`, as the eval
  CLI sets it up; `roll` shifts passage ids across the batch (other passages' memory)."""
  base = world["model"]
  memory = (
      stored_memory.MemorySource()
      if reader == "compute"
      else stored_memory.MemorySource(
          reader,
          world["store"],
          vocabulary_path=world["vocabulary"],
          passage_table_dir=world["passages"],
      )
  )
  model = reader_models.ReaderModel(base.config, base.reader, memory=memory)
  t, state, step = eval_lib.inference_setup(model, world["model_dir"], None, None)
  assert step == STEP
  feed = memory_feed.attach(t, step)
  prepare = feed.prepare
  if roll:
    prepare = lambda b: feed.prepare({**b, "passage_ids": np.roll(b["passage_ids"], roll, 0)})
  pairs, sums = evaluation.predictions(
      t, state, world["source"], "validation", BATCH, prepare=prepare
  )
  return [text for _, text in pairs], jax.device_get(sums), feed


@pytest.fixture(scope="module")
def computed(world):
  return _evaluate(world, "compute")


@pytest.mark.parametrize("reader", ["host", "device"])
def test_the_precomputed_store_predicts_as_computed_memory(world, computed, reader):
  texts, sums, feed = _evaluate(world, reader)
  want_texts, want_sums, _ = computed
  assert feed.store.num_passages == len(PassageTable(world["passages"]))
  assert feed.store.fingerprint["checkpoint_step"] == STEP
  assert len(texts) == 12 and texts == want_texts
  assert float(sums["weight"]) == float(want_sums["weight"]) > 0
  if world["model"].reader.token_pruning is None:  # Memory tokens = passage tokens.
    assert float(sums["tokens"]) == float(want_sums["tokens"])
  else:  # The memory encoder reads every passage token; the store holds the kept ones.
    assert float(sums["weight"]) < float(sums["tokens"]) < float(want_sums["tokens"])
    assert feed.store.positions and feed.store.passage_length == LP // 2
  assert float(sums["correct"]) == float(want_sums["correct"])
  np.testing.assert_allclose(float(sums["loss"]), float(want_sums["loss"]), rtol=1e-5)


def test_other_passages_memory_changes_the_loss(world, computed):
  """The equality above is not the model ignoring its memory."""
  _, sums, _ = _evaluate(world, "host", roll=1)
  # 3e-4 relative after one training step: well outside the 1e-5 the readers agree within.
  assert abs(float(sums["loss"]) / float(computed[1]["loss"]) - 1) > 1e-4


def test_a_store_of_other_pruning_is_refused_by_name(world):
  base = world["model"]
  other = None if base.reader.token_pruning is not None else TokenPruning(budget=1.0)
  model = reader_models.ReaderModel(
      base.config,
      dataclasses.replace(base.reader, token_pruning=other),
      memory=stored_memory.MemorySource("device", world["store"]),
  )
  field = "memory_length" if other is None else "token_pruning"  # Pruned reads the plain one.
  with pytest.raises(StoreError, match=f"fingerprint field '{field}'"):
    memory_feed.open_feed(model, world["mesh"], world["rules"], STEP)
