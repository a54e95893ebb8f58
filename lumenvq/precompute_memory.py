r"""Precompute a reader's memory over the whole passage table into a memory store.

    python -m lumenvq.precompute_memory --gin_file=gin_configs/models/tiny.gin \
        --gin_file=gin_configs/architectures/lumen_vq.gin \
        --gin_file=gin_configs/runs/precompute.gin --gin.MODEL_DIR="'/tmp/vq'" \
        --gin.STORE_PATH="'/tmp/vq/memory'" --gin.PASSAGES_DIR="'demo_out/passages'" \
        --gin.VOCABULARY_PATH="'demo_out/vocab/spm.model'"

Restores the checkpoint, tokenizes every passage as the SeqIO tasks do
(`seqio_tasks.tokenize_passages`: SentencePiece + EOS, then cut to the passage length like
the reader's feature converter), runs the memory encoder batched and jitted, and writes
`memory_store` shards: LUMEN-VQ's codes with its codebooks, LUMEN's (and LUMEN-Light's
first M) memory vectors in MEMORY_DTYPE. FiD has no memory and is refused.

Several processes split the shards (shard i goes to process i % process_count); each runs
on its own devices (a mesh over `jax.local_devices()`, MESH_SHAPE applies per process), so
no step waits on another process; one barrier at the end lets process 0 write COMPLETE.
Finished shards are skipped on a rerun, so a killed job resumes, and its store is
byte-identical to an uninterrupted one: a shard's passages are batched the same way
whichever process computes it, and a shard is written whole.
"""

import concurrent.futures
import time
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lumenvq import eval as eval_lib
from lumenvq.data import vocab
from lumenvq.data.passage_table import PassageTable
from lumenvq.memory import memory_store, store_fingerprint
from lumenvq.model import reader_models  # pylint: disable=unused-import  (gin)
from lumenvq.model import readers
from lumenvq.model.network_config import T5Config  # pylint: disable=unused-import  (gin)
from lumenvq.quant import pq_codec, quantizer
from lumenvq.training import checkpoints, gin_cli, partitioning

MAX_PENDING_WRITES = 2  # Shards being written while the next ones compute.


class PrecomputeError(ValueError):
  """A model or setting the precompute cannot serve."""


def store_layout(model, variables, dtype) -> dict:
  """`MemoryStore.create` arguments fixed by the model: kind, shape per passage, dtype,
  codebooks (LUMEN-VQ's trained ones, from `variables`)."""
  reader, t5 = model.reader, model.config
  if reader.architecture == "fid":
    raise PrecomputeError(
        "ReaderConfig.architecture='fid' has no memory encoder: FiD encodes "
        "passages per question, there is no memory to precompute"
    )
  if reader.architecture != "lumen_vq":
    if reader.token_pruning is not None:
      raise PrecomputeError(
          f"ReaderConfig.token_pruning with architecture={reader.architecture!r}: a pruned "
          "store keeps each token's position beside its codes, so it stores lumen_vq codes"
      )
    return dict(
        kind="vectors",
        passage_length=reader.memory_length,
        width=t5.emb_dim,
        dtype=dtype,
        num_residual=1,
    )
  state = variables[quantizer.QUANTIZER_COLLECTION]["quantizer"]
  if not bool(np.asarray(state["initialized"])):
    raise PrecomputeError(
        "the checkpoint's LUMEN-VQ codebooks were never initialized (no "
        "train step seeded them): train the model before precomputing"
    )
  r, g = reader.num_residual, reader.subspaces(t5.emb_dim)
  codebooks = np.asarray(jax.device_get(readers.export_codebooks(variables)), np.float32)
  return dict(
      kind="codes",
      passage_length=reader.memory_length,
      width=reader.stored_width(t5.emb_dim),
      dtype=pq_codec.code_dtype(reader.codebook_size),
      num_residual=r,
      positions=reader.stores_positions,
      codebooks=codebooks,
  )


def memory_step(model, layout: dict, mesh):
  """jit: (variables, tokens [B, Lp]) -> (values [B, Lm, W] zero past each length,
  lengths [B]), batch sharded over `data`."""
  codes = layout["kind"] == "codes"

  def step(variables, tokens):
    memory = model.module.apply(
        variables, tokens, return_codes=codes, method=readers.Reader.compute_memory
    )
    if codes:  # [..., R, G] -> R*G, after the position when pruned.
      values = readers.code_rows(memory, layout["width"])
    else:
      values = memory.vectors.astype(layout["dtype"])
    values = jnp.where(memory.mask[..., None], values, jnp.zeros((), values.dtype))
    return values, jnp.sum(memory.mask, axis=-1, dtype=jnp.int32)

  return jax.jit(
      step,
      in_shardings=(None, partitioning.data_sharding(mesh, 2)),
      out_shardings=(partitioning.data_sharding(mesh, 3), partitioning.data_sharding(mesh, 1)),
  )


def token_batches(
    table: PassageTable, vocabulary, shards, store, batch_size: int, passage_length: int
):
  """(shard, row offset in the shard, real rows, tokens int32 [batch_size, Lp]) for every
  batch of the given shards, in order. Tokenized by `seqio_tasks.tokenize_passages` in a
  tf.data pipeline (prefetched, so it overlaps the device); padding rows are id -1 (all 0)."""
  import seqio  # pylint: disable=g-import-not-at-top  (slow: only where data is built)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from lumenvq.data import seqio_tasks  # pylint: disable=g-import-not-at-top

  plan = [
      (shard, first, min(batch_size, stop - start - first))
      for shard in shards
      for start, stop in [store.shard_range(shard)]
      for first in range(0, stop - start, batch_size)
  ]

  def texts():
    for shard, first, n in plan:
      start = store.shard_range(shard)[0] + first
      ids = np.full(batch_size, -1, np.int32)
      ids[:n] = np.arange(start, start + n)
      yield {
          "passage_ids": ids,
          "passages": np.array(
              [table.text(i) for i in range(start, start + n)] + [""] * (batch_size - n),
              dtype=object,
          ),
      }

  ds = tf.data.Dataset.from_generator(
      texts,
      output_signature={
          "passage_ids": tf.TensorSpec((batch_size,), tf.int32),
          "passages": tf.TensorSpec((batch_size,), tf.string),
      },
  )
  ds = seqio_tasks.tokenize_passages(ds, {"inputs": seqio.Feature(vocabulary)})
  for (shard, first, n), example in zip(plan, ds.prefetch(4).as_numpy_iterator()):
    tokens = np.zeros((batch_size, passage_length), np.int32)
    cut = example["passage_tokens"][:, :passage_length]  # As ReaderFeatureConverter cuts.
    tokens[:, : cut.shape[1]] = cut
    yield shard, first, n, tokens


class _ShardWriter:
  """Collects a shard's batches and writes full shards on a background thread (at most
  MAX_PENDING_WRITES at a time); errors surface on the next call."""

  def __init__(self, store, marker: dict):
    self.store, self.marker = store, marker
    self.pool = concurrent.futures.ThreadPoolExecutor(1)
    self.pending, self.buffers = [], {}

  def add(self, shard, first, n, values, lengths):
    start, stop = self.store.shard_range(shard)
    if shard not in self.buffers:
      self.buffers[shard] = (
          np.empty((stop - start,) + values.shape[1:], values.dtype),
          np.empty(stop - start, np.int32),
          [0],
      )
    buf_values, buf_lengths, filled = self.buffers[shard]
    buf_values[first : first + n], buf_lengths[first : first + n] = values[:n], lengths[:n]
    filled[0] += n
    if filled[0] == stop - start:
      del self.buffers[shard]
      self._wait(MAX_PENDING_WRITES - 1)
      self.pending.append(
          self.pool.submit(self.store.write_shard, shard, buf_values, buf_lengths, self.marker)
      )

  def _wait(self, keep: int):
    while len(self.pending) > keep:
      self.pending.pop(0).result()

  def close(self):
    self._wait(0)
    self.pool.shutdown(wait=True)


@gin.configurable
def precompute(
    *,
    model_dir: Optional[str] = gin.REQUIRED,
    model=gin.REQUIRED,
    store_path: str = gin.REQUIRED,
    passages_dir: str = gin.REQUIRED,
    vocabulary_path: str = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    checkpoint_step: Optional[int] = None,
    checkpoint_path: Optional[str] = None,
    shard_passages: int = 4096,
    dtype: str = "bfloat16",
    progress: bool = True,
) -> str:
  """Writes (or completes) the memory store at `store_path`; returns its path.

  `model_dir`/`checkpoint_step`/`checkpoint_path` pick the checkpoint as in eval;
  `dtype` is the stored dtype of LUMEN memory vectors (codes take the codebook's).
  """
  table = PassageTable(passages_dir)
  vocabulary = vocab.get_vocabulary(vocabulary_path)
  trainer, state, step = eval_lib.inference_setup(
      model, model_dir, checkpoint_step, checkpoint_path, devices=jax.local_devices()
  )
  partitioning.check_batch(batch_size, trainer.mesh)
  variables = {"params": state.params, **state.model_state}
  layout = store_layout(model, variables, dtype)
  fingerprint = store_fingerprint.fingerprint_for(model, step, vocabulary_path, passages_dir)
  create = dict(
      layout, num_passages=len(table), fingerprint=fingerprint, shard_passages=shard_passages
  )
  index, count = jax.process_index(), jax.process_count()
  if index == 0:  # One creator; the others then find its store.json (create is idempotent).
    store = memory_store.MemoryStore.create(store_path, **create)
  if count > 1:
    multihost_utils.sync_global_devices("precompute_memory: store created")
  if index != 0:
    store = memory_store.MemoryStore.create(store_path, **create)

  mine = range(index, store.num_shards, count)
  done = store.done_shards()
  todo = [s for s in mine if s not in done]
  total = sum(stop - start for start, stop in map(store.shard_range, todo))
  logging.info(
      "process %d/%d: %d of its %d shards already done (skipped), %d shards "
      "(%d passages) to compute from step %d into %s",
      index,
      count,
      len(mine) - len(todo),
      len(mine),
      len(todo),
      total,
      step,
      store_path,
  )
  run = _run(
      model,
      layout,
      trainer,
      variables,
      table,
      vocabulary,
      store,
      todo,
      batch_size,
      total,
      progress and index == 0,
      {"process_index": index, "checkpoint_step": step},
  )
  logging.info(
      "process %d: %d passages in %.1f s (%.1f passages/s)",
      index,
      total,
      run,
      total / max(run, 1e-9),
  )
  if count > 1:
    multihost_utils.sync_global_devices("precompute_memory: shards written")
  if index == 0:
    store.finalize()
    logging.info(
        "memory store %s is COMPLETE: %d passages in %d shards",
        store_path,
        store.num_passages,
        store.num_shards,
    )
  return store_path


def _run(
    model,
    layout,
    trainer,
    variables,
    table,
    vocabulary,
    store,
    shards,
    batch_size,
    total,
    progress,
    marker,
) -> float:
  """Computes and writes `shards`; returns the seconds it took."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  step_fn = memory_step(model, layout, trainer.mesh)
  tokens_sharding = partitioning.data_sharding(trainer.mesh, 2)  # This process' devices.
  writer = _ShardWriter(store, marker)
  bar = tqdm(
      total=int(total),
      unit="passage",
      unit_scale=True,
      disable=not progress,
      desc="precompute_memory",
  )
  start = time.perf_counter()
  pending = None  # One batch in flight: the next is dispatched before this one is read.
  try:
    with partitioning.axis_rules_and_mesh(trainer.mesh, trainer.rules):
      for shard, first, n, tokens in token_batches(
          table, vocabulary, shards, store, batch_size, model.reader.passage_length
      ):
        out = step_fn(variables, jax.device_put(tokens, tokens_sharding))
        if pending is not None:
          _collect(writer, bar, *pending)
        pending = (shard, first, n, out)
      if pending is not None:
        _collect(writer, bar, *pending)
    writer.close()  # Waits for the last writes; raises their errors.
  finally:
    writer.pool.shutdown(wait=True, cancel_futures=True)  # After an error: no write left.
    bar.close()
  return time.perf_counter() - start


def _collect(writer, bar, shard, first, n, out):
  values, lengths = jax.device_get(out)
  writer.add(shard, first, n, np.asarray(values), np.asarray(lengths))
  bar.update(n)


if __name__ == "__main__":
  gin_cli.run_configurable(
      precompute,
      (
          memory_store.StoreError,
          PrecomputeError,
          checkpoints.CheckpointError,
          partitioning.PartitioningError,
      ),
  )
