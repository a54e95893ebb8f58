"""The memory precompute on a tiny reader checkpoint, a demo passage table and a trained
SentencePiece vocabulary: LUMEN-VQ codes bit-identical to `compute_memory` on the same
tokens, with the model's codebooks; LUMEN vectors equal up to bf16, LUMEN-Light's first M;
FiD and unseeded codebooks refused; `python -m lumenvq.precompute_memory` on 2 processes
(gloo) writes disjoint shards of a store byte-identical to one process'; killed with -9
after its first shard, the store is refused as incomplete, and a rerun skips the finished
shards and ends byte-identical to an uninterrupted run.

Every run computes 2 passages per device (8 devices x 16 in this process, 2 x 4 in the
subprocesses), so the per-device programs and their results are the same.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lumenvq import paths, precompute_memory
from lumenvq.data import demo, kilt, passages, vocab
from lumenvq.data.passage_table import PassageTable
from lumenvq.memory import memory_store, store_fingerprint
from lumenvq.memory.memory_store import MemoryStore
from lumenvq.model import readers
from lumenvq.training import checkpoints, optimizers, partitioning, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = ["gin_configs/models/tiny.gin", "gin_configs/architectures/lumen_vq.gin"]
BINDINGS = [
    "ReaderConfig.passage_length = 48",
    "ReaderConfig.codebook_size = 16",
    "ReaderConfig.light_length = 8",
]
STEP, SHARD = 7, 4  # Small shards: many of them, so a kill lands mid-run.


@pytest.fixture(scope="module")
def make_model(reader_from_gin):
  """The reader of GIN_FILES + BINDINGS (what the CLI runs build) for an architecture."""
  return lambda architecture: reader_from_gin(
      GIN_FILES, BINDINGS + [f"ReaderConfig.architecture = '{architecture}'"]
  )


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_model):
  """Passage table, vocabulary, and a LUMEN-VQ checkpoint at STEP whose codebooks are set
  (random, marked initialized); LUMEN models restore its parameters too."""
  root = tmp_path_factory.mktemp("precompute")
  data = str(root / "data")
  demo.write_demo(data, num_entities=100, train_size=1, dev_size=1)
  source = os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, str(root / "passages"), words=12, progress=False)
  spm = vocab.train_sentencepiece(
      source, str(root / "vocab" / "spm"), vocab_size=400, max_sentences=None, threads=1
  )
  model = make_model("lumen_vq")
  t = trainer.Trainer(
      model,
      optimizers.make_optimizer(),
      partitioning.make_mesh(),
      partitioning.standard_logical_axis_rules(),
  )
  state = t.init_state()
  q = dict(state.model_state["quantizer"]["quantizer"])
  rng = np.random.default_rng(0)
  q["codebooks"] = jax.device_put(
      rng.normal(size=q["codebooks"].shape).astype(np.float32), q["codebooks"].sharding
  )
  q["initialized"] = jax.device_put(np.ones((), bool), q["initialized"].sharding)
  state = state.replace(model_state={"quantizer": {"quantizer": q}})
  ckpt = checkpoints.Checkpointer(str(root / "model" / "checkpoints"))
  ckpt.save(STEP, state)
  ckpt.wait()
  ckpt.close()
  variables = jax.device_get({"params": state.params, **state.model_state})
  return dict(
      root=root,
      passages=str(root / "passages"),
      vocabulary=spm,
      model=model,
      make_model=make_model,
      variables=variables,
      model_dir=str(root / "model"),
  )


def _precompute(world, architecture, store, batch_size=16, **kwargs):
  model = world["model"] if architecture == "lumen_vq" else world["make_model"](architecture)
  precompute_memory.precompute(
      model_dir=world["model_dir"],
      model=model,
      store_path=str(store),
      passages_dir=world["passages"],
      vocabulary_path=world["vocabulary"],
      batch_size=batch_size,
      shard_passages=SHARD,
      progress=False,
      **kwargs,
  )
  return model


@pytest.fixture(scope="module")
def vq_store(world):
  """The one-process store (8 devices, 16 passages a step)."""
  path = world["root"] / "vq_store"
  _precompute(world, "lumen_vq", path)
  return path


def _tokens(world, lp=48):
  """Every passage as the SeqIO tasks tokenize it (SentencePiece + EOS), cut to lp."""
  vocabulary = vocab.get_vocabulary(world["vocabulary"])
  table = PassageTable(world["passages"])
  tokens = np.zeros((len(table), lp), np.int32)
  for i, text in enumerate(table.iter_texts()):
    ids = (list(vocabulary.encode(text)) + [vocabulary.eos_id])[:lp]
    tokens[i, : len(ids)] = ids
  return tokens


def _direct_memory(model, variables, tokens, return_codes):
  fn = jax.jit(
      lambda v, t: model.module.apply(
          v, t, return_codes=return_codes, method=readers.Reader.compute_memory
      )
  )
  return jax.device_get(fn(variables, tokens))


def test_codes_equal_compute_memory_on_the_same_tokens(world, vq_store):
  model = world["model"]
  fingerprint = store_fingerprint.fingerprint_for(
      model, STEP, world["vocabulary"], world["passages"]
  )
  store = MemoryStore.open(str(vq_store), expected_fingerprint=fingerprint)
  tokens = _tokens(world)
  assert (store.kind, store.num_passages, store.passage_length, store.width, store.dtype) == (
      "codes",
      len(tokens),
      48,
      4,
      np.uint8,
  )  # d = 64: G = 4 subspaces, C = 16 codes.
  np.testing.assert_array_equal(store.codebooks, readers.export_codebooks(world["variables"]))
  memory = _direct_memory(model, world["variables"], tokens, True)
  codes, lengths = store.read(np.arange(len(tokens)))
  np.testing.assert_array_equal(lengths, (tokens > 0).sum(-1))
  assert lengths.max() == 48 and lengths.min() < 48  # Some passages are cut, some are not.
  np.testing.assert_array_equal(store.mask(lengths, 48), memory.mask)
  want = np.where(memory.mask[..., None], memory.codes, 0)
  np.testing.assert_array_equal(codes, want)
  assert len(np.unique(codes[memory.mask])) == 16  # Every code is used: a real test.


@pytest.mark.parametrize("architecture", ["lumen", "lumen_light"])
def test_lumen_vectors_equal_compute_memory_up_to_bf16(world, architecture):
  path = world["root"] / f"{architecture}_store"
  model = _precompute(world, architecture, path)
  store = MemoryStore.open(
      str(path),
      store_fingerprint.fingerprint_for(model, STEP, world["vocabulary"], world["passages"]),
  )
  tokens = _tokens(world)
  memory = _direct_memory(model, {"params": world["variables"]["params"]}, tokens, False)
  m = model.reader.memory_length  # LUMEN-Light keeps the first 8 tokens' memory.
  assert (store.kind, store.dtype.name, store.passage_length, store.width, store.codebooks) == (
      "vectors",
      "bfloat16",
      m,
      64,
      None,
  )
  vectors, lengths = store.read(np.arange(len(tokens)))
  np.testing.assert_array_equal(lengths, np.minimum((tokens > 0).sum(-1), m))
  want = np.where(memory.mask[..., None], memory.vectors, 0)
  np.testing.assert_allclose(vectors.astype(np.float32), want, rtol=2**-8, atol=1e-6)
  assert np.abs(want).max() > 0.1


def test_fid_and_unseeded_codebooks_are_refused(world, tmp_path):
  with pytest.raises(precompute_memory.PrecomputeError, match="'fid' has no memory encoder"):
    _precompute(world, "fid", tmp_path / "fid_store")
  assert not (tmp_path / "fid_store").exists()
  unseeded = {
      "params": world["variables"]["params"],
      "quantizer": {
          "quantizer": dict(
              world["variables"]["quantizer"]["quantizer"], initialized=np.zeros((), bool)
          )
      },
  }
  with pytest.raises(precompute_memory.PrecomputeError, match="codebooks were never init"):
    precompute_memory.store_layout(world["model"], unseeded, "bfloat16")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(world, store, *extra):
  return [
      sys.executable,
      "-m",
      "lumenvq.precompute_memory",
      *[f"--gin_file={f}" for f in GIN_FILES + ["gin_configs/runs/precompute.gin"]],
      *[f"--gin.{b.replace(' = ', '=')}" for b in BINDINGS],
      f"--gin.MODEL_DIR='{world['model_dir']}'",
      f"--gin.STORE_PATH='{store}'",
      f"--gin.PASSAGES_DIR='{world['passages']}'",
      f"--gin.VOCABULARY_PATH='{world['vocabulary']}'",
      "--gin.BATCH_SIZE=4",
      f"--gin.SHARD_PASSAGES={SHARD}",
      *extra,
  ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _files(store):
  """{relative path: bytes} of the arrays (values, lengths, codebooks), local or gs://."""
  root = paths.path(str(store))
  out = {}
  for array in ("values", "lengths", "codebooks"):
    for directory, _, files in (root / array).walk():
      # A gs:// walk names directories without the scheme: key by what follows the store.
      sub = str(directory).split(f"{root.name}/", 1)[1]
      for name in files:
        out[f"{sub}/{name}"] = (root / sub / name).read_bytes()
  return out


def _assert_same_store(got, want):
  got_files, want_files = _files(got), _files(want)
  assert sorted(got_files) == sorted(want_files)
  for name in want_files:
    assert got_files[name] == want_files[name], name


def test_two_processes_write_disjoint_shards_of_the_same_store(world, vq_store, env, tmp_path):
  store = tmp_path / "store"
  port = _free_port()
  procs = [
      subprocess.Popen(
          _command(
              world,
              store,
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          cwd=REPO,
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[1] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  assert "jax.distributed.initialize(localhost" in logs[1]
  assert "is COMPLETE" in logs[0] and "is COMPLETE" not in logs[1]  # Process 0 finalizes.
  owners = {
      int(name): json.loads((store / "done" / name).read_text())["process_index"]
      for name in os.listdir(store / "done")
  }
  assert owners == {shard: shard % 2 for shard in range(len(owners))}
  assert len(owners) == MemoryStore.open(str(store)).num_shards > 50
  _assert_same_store(store, vq_store)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_kill_9_then_rerun_completes_a_byte_identical_store(
    world, vq_store, env, tmp_path, where, request
):
  """Also on an object store (the local Cloud Storage server): a shard's done marker is an
  object written after its arrays, and COMPLETE after every marker, so no listing of a
  killed run's objects reads as a finished store."""
  if where == "gs":
    store = f"{request.getfixturevalue('gcs_bucket')}/precompute-kill-{os.getpid()}"
    env = {**os.environ, **env}  # The server's settings, which gcs_bucket put in os.environ.
  else:
    store = str(tmp_path / "store")
  proc = subprocess.Popen(
      _command(world, store),
      cwd=REPO,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  first = paths.path(store) / "done" / "0"
  deadline = time.time() + 240
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002 if where == "local" else 0.02)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
  num_shards = len(range(0, len(PassageTable(world["passages"])), SHARD))
  done = sorted(int(p.name) for p in (paths.path(store) / "done").iterdir())
  print(f"killed after {len(done)} of {num_shards} shards")
  assert 1 <= len(done) < num_shards
  with pytest.raises(
      memory_store.StoreError, match=f"incomplete: {len(done)} of {num_shards} shards done; rerun"
  ):
    MemoryStore.open(store)
  marker = lambda s: (paths.path(store) / "done" / str(s)).stat().mtime
  marker_times = {s: marker(s) for s in done}
  assert all(marker_times.values())  # Object stores report modification times too.
  _precompute(world, "lumen_vq", store)
  assert {s: marker(s) for s in done} == marker_times  # Done shards are not written again.
  assert MemoryStore.open(str(store)).done_shards() == set(range(num_shards))
  _assert_same_store(store, vq_store)
  size = MemoryStore.open(str(store)).bytes_on_disk()  # Every object, markers included.
  assert (
      size
      == MemoryStore.open(str(vq_store)).bytes_on_disk()
      > sum(map(len, _files(store).values()))
  )
