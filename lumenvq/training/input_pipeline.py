"""Task data to per-process model batches: SeqIO tasks (or the numpy debug sources),
the model's feature converter, and global jax.Arrays for jit.

Resumption: the training stream is a deterministic function of the seed and
the step. Each checkpoint keeps every process's stream position
(`input_checkpoint`: the tf.data iterator's state), from which a resumed run
continues in constant time; without one (an older checkpoint, another number
of processes) each process rebuilds its stream (same seed, same shard) and
skips the s * local_batch examples it had consumed. Either way the batches
after a resume are the ones an uninterrupted run would have seen.
Each process reads its own shard of the examples (SeqIO `ShardInfo`, one
shard per position on the mesh's `data` axis, interleaved as
`tf.data.Dataset.shard` does), so the global batch of a step is the same set
of examples for any number of processes.
"""

import contextlib
import dataclasses
import importlib
from typing import Callable, Iterator, Optional, Sequence

import gin
import jax

from lumenvq.data import copy_task, kilt, passage_copy_task
from lumenvq.training import input_checkpoint, partitioning


def _is_kilt_name(name: str) -> bool:
  return name in kilt.TASKS or (name.startswith("kilt_") and name[5:] in kilt.TASKS)


class SeqioSource:
  """A SeqIO task or mixture; seqio (and the task modules) are imported on construction."""

  def __init__(
      self,
      mixture_or_task_name: str,
      task_feature_lengths: dict,
      task_modules: Sequence[str] = ("tasks", "tasks.debug"),
  ):
    # The CLIs lock gin after parsing; task modules imported only now may still
    # register their settings (e.g. `demo_data`), left at their defaults. A
    # gin file that binds them imports `tasks` itself, at parse time.
    with gin.unlock_config():
      for module in task_modules:
        importlib.import_module(module)
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    self._seqio, self._tf = seqio, tf
    self.name = mixture_or_task_name
    self.feature_lengths = dict(task_feature_lengths)
    self.provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = getattr(self.provider, "tasks", [self.provider])
    # A KILT task writes KILT predictions: named after a KILT dataset, or marked.
    self.is_kilt = all(getattr(t, "is_kilt", False) or _is_kilt_name(t.name) for t in tasks)

  def dataset(
      self,
      split: str,
      *,
      shard_index: int = 0,
      num_shards: int = 1,
      shuffle: bool = False,
      seed: int = 0,
      repeat: bool = False,
      passage_texts: bool = True,
  ):
    """This process's shard of `split` as a tf.data dataset (its iterators checkpoint);
    `passage_texts=False`: KILT examples without passage texts and tokens."""
    shard = self._seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    with contextlib.ExitStack() as scope:
      if not passage_texts:
        from lumenvq.data import seqio_tasks  # pylint: disable=g-import-not-at-top  (imports seqio)

        scope.enter_context(seqio_tasks.without_passage_texts())
      ds = self.provider.get_dataset(
          sequence_length=self.feature_lengths,
          split=split,
          shuffle=shuffle,
          seed=seed,
          shard_info=shard,
          num_epochs=None if repeat else 1,
          use_cached=False,
      )
    # Without tf.data's autotuning thread: it sleeps up to a minute between rounds, and
    # deleting the iterator waits for it (measured: 45-55 s lost at the end of each demo
    # train run). Reading a demo batch costs about the same without it (0.042 vs 0.038 s).
    options = self._tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)

  def examples(self, split: str, *, skip: int = 0, **kwargs) -> Iterator[dict]:
    for example in self.dataset(split, **kwargs).skip(skip).as_numpy_iterator():
      yield input_checkpoint.to_python(example)

  def decode(self, ids) -> str:
    return self.provider.output_features["targets"].vocabulary.decode([int(i) for i in ids])

  def postprocess(self, text: str, example: dict, is_target: bool):
    return self.provider.postprocess_fn(text, example=example, is_target=is_target)

  def score(self, targets, predictions) -> dict:
    results = {}
    for fn in self.provider.predict_metric_fns:
      for name, value in fn(targets, predictions).items():
        results[name] = float(getattr(value, "value", value))
    return results

  def task_sources(self):
    """One source per task (a mixture's tasks are decoded and written separately)."""
    tasks = getattr(self.provider, "tasks", None)
    return (
        [self] if tasks is None else [SeqioSource(t.name, self.feature_lengths, ()) for t in tasks]
    )

  def eval_sources(self):
    return [s for s in self.task_sources() if s.provider.predict_metric_fns]


@gin.configurable
def get_source(
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: dict = gin.REQUIRED,
    backend: str = "seqio",
):
  """The task's data: `backend='seqio'`, or `'numpy'` for the debug tasks without seqio."""
  if backend == "seqio":
    return SeqioSource(mixture_or_task_name, task_feature_lengths)
  if backend == "numpy":
    if mixture_or_task_name in passage_copy_task.TASKS:
      return passage_copy_task.PassageCopySource(mixture_or_task_name, task_feature_lengths)
    return copy_task.CopySource(mixture_or_task_name, task_feature_lengths)
  raise ValueError(f"get_source.backend must be 'seqio' or 'numpy', got {backend!r}")


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which rows of a global batch this process feeds: rows [start, stop), which is
  shard `shard_index` of `num_shards` equal shards (T5X's data layout)."""

  batch_size: int
  start: int
  stop: int

  @property
  def local_size(self) -> int:
    return self.stop - self.start

  @property
  def num_shards(self) -> int:
    return self.batch_size // self.local_size

  @property
  def shard_index(self) -> int:
    return self.start // self.local_size


def data_layout(mesh, batch_size: int) -> DataLayout:
  """This process's rows: those its devices hold under the `data` axis sharding.

  Processes that share `data` positions (a `model` axis spanning hosts) feed
  the same rows; otherwise each feeds a disjoint contiguous slice.
  """
  partitioning.check_batch(batch_size, mesh)
  indices = partitioning.data_sharding(mesh).addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in indices.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in indices.values()]
  layout = DataLayout(batch_size, min(starts), max(stops))
  if batch_size % layout.local_size or layout.start % layout.local_size:
    raise partitioning.PartitioningError(
        f"process {jax.process_index()} holds rows [{layout.start}, {layout.stop}) of "
        f"BATCH_SIZE={batch_size}: not one of equal contiguous shards"
    )
  return layout


def train_batches(
    source,
    convert: Callable,
    layout: DataLayout,
    start_step: int,
    *,
    split: str = "train",
    shuffle: bool = False,
    seed: int = 0,
    position: Optional[bytes] = None,
) -> input_checkpoint.CheckpointableBatches:
  """This process's rows of the global batches for steps start_step+1, start_step+2, ...

  `position`: what `.position(start_step)` of the interrupted run's stream returned (saved
  with its checkpoint), to continue without re-reading the consumed examples.
  """
  kwargs = dict(
      shard_index=layout.shard_index,
      num_shards=layout.num_shards,
      shuffle=shuffle,
      seed=seed,
      repeat=True,
  )
  # A converter that reads passages by id (stored memory) gets examples without passage
  # texts: looking them up and tokenizing them is most of an example's cost.
  passage_texts = getattr(convert, "reads_passage_texts", True)
  dataset = None
  if hasattr(source, "dataset"):
    dataset = lambda skip: source.dataset(split, passage_texts=passage_texts, **kwargs).skip(skip)

  return input_checkpoint.CheckpointableBatches(
      lambda skip: source.examples(split, skip=skip, **kwargs),
      dataset,
      convert,
      layout.local_size,
      start_step,
      position,
      what=(
          f"split {split!r} of {source.name} (shard {layout.shard_index} of "
          f"{layout.num_shards}, shuffle={shuffle}, seed={seed}"
          f"{'' if passage_texts else ', no passage texts'})"
      ),
  )


def eval_batches(
    examples: Sequence[dict],
    convert: Callable,
    layout: DataLayout,
    max_examples: Optional[int] = None,
) -> Iterator[tuple]:
  """(this process's rows of a global batch, the batch's examples, number of real rows).

  Every process reads the whole eval split and feeds its rows of each global
  batch; the last batch is padded with empty rows (zero loss weight).
  """
  examples = list(examples)[:max_examples]
  for first in range(0, len(examples), layout.batch_size):
    chunk = examples[first : first + layout.batch_size]
    rows = chunk[layout.start : layout.stop]
    rows = rows + [None] * (layout.local_size - len(rows))
    yield convert(rows), chunk, len(chunk)


def to_global(local_batch: dict, mesh, batch_size: int) -> dict:
  """Assembles the processes' rows into global arrays sharded over `data`."""
  return {
      k: jax.make_array_from_process_local_data(
          partitioning.data_sharding(mesh, v.ndim), v, (batch_size,) + v.shape[1:]
      )
      for k, v in local_batch.items()
  }
