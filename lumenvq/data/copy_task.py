"""The debug tasks `lumenvq_debug_copy` / `lumenvq_debug_reverse`: copy or reverse a
random lowercase word, in a byte vocabulary. Needs no downloaded data.

Every example is a pure function of (task, split, index), so a stream of them
can be regenerated from any position: that is what makes training resumable
to the step and identical across process counts. `tasks/debug.py` registers
the same examples as SeqIO tasks; `CopySource` serves them without importing
seqio (the import costs ~14 s), for tests and quick runs. Both give the same
token ids, trimming and per-process sharding (`tf.data.Dataset.shard`'s
interleaving: shard i of n holds the examples i, i+n, i+2n, ...).
"""

import itertools
from typing import Iterator, Optional, Sequence

import gin
import numpy as np

TASKS = {"lumenvq_debug_copy": False, "lumenvq_debug_reverse": True}  # name -> reverse?
SPLIT_SIZES = {"train": None, "validation": 64}  # None: an endless stream
_SPLIT_SEEDS = {"train": 1, "validation": 2}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 10

# seqio.ByteVocabulary's layout: 0 pad, 1 EOS, 2 UNK, then the 256 byte values.
PAD_ID, EOS_ID, NUM_SPECIAL = 0, 1, 3
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


def text_example(task: str, split: str, index: int) -> dict:
  """{"inputs": word, "targets": word or its reverse} for example `index` of `split`."""
  if task not in TASKS:
    raise ValueError(f"unknown debug task {task!r}; known: {sorted(TASKS)}")
  if split not in SPLIT_SIZES:
    raise ValueError(f"debug task {task} has no split {split!r}; it has {sorted(SPLIT_SIZES)}")
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  word = "".join(rng.choice(list(ALPHABET), size=rng.integers(MIN_LEN, MAX_LEN + 1)))
  return {"inputs": word, "targets": word[::-1] if TASKS[task] else word}


def split_indices(split: str) -> Iterator[int]:
  size = SPLIT_SIZES[split]
  return itertools.count() if size is None else iter(range(size))


def encode(text: str, length: Optional[int]) -> np.ndarray:
  """Byte ids + EOS, trimmed to `length` first (seqio's append_eos_after_trim)."""
  ids = [b + NUM_SPECIAL for b in text.encode("utf-8")]
  if length is not None:
    ids = ids[: length - 1]
  return np.asarray(ids + [EOS_ID], np.int32)


def decode(ids: Sequence[int]) -> str:
  """Text up to the first EOS, special ids dropped (seqio.ByteVocabulary.decode)."""
  ids = [int(i) for i in ids]
  if EOS_ID in ids:
    ids = ids[: ids.index(EOS_ID)]
  return bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < BYTE_VOCAB_SIZE).decode(
      "utf-8", errors="ignore"
  )


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Percentage of predictions equal to their target (a SeqIO metric fn)."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"sequence_accuracy": 100.0 * hits / max(len(targets), 1)}


@gin.configurable
class CopySource:
  """A debug task served directly from numpy (the interface of `input_pipeline.SeqioSource`)."""

  is_kilt = False
  TASKS = TASKS

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: dict):
    if mixture_or_task_name not in self.TASKS:
      raise ValueError(
          f"{type(self).__name__} serves only the debug tasks "
          f"{sorted(self.TASKS)}, not {mixture_or_task_name!r} "
          "(MIXTURE_OR_TASK_NAME)"
      )
    self.name = mixture_or_task_name
    self.feature_lengths = dict(task_feature_lengths)

  def examples(
      self,
      split: str,
      *,
      shard_index: int = 0,
      num_shards: int = 1,
      shuffle: bool = False,
      seed: int = 0,
      repeat: bool = False,
      skip: int = 0,
  ) -> Iterator[dict]:
    """Tokenized examples of this process's shard, the first `skip` left out.

    The debug examples are already random, so `shuffle` and `seed` change nothing.
    """
    del shuffle, seed
    indices = itertools.islice(split_indices(split), shard_index, None, num_shards)
    if repeat and SPLIT_SIZES[split] is not None:
      indices = itertools.cycle(list(indices))
    for index in itertools.islice(indices, skip, None):
      yield self.example(split, index)

  def example(self, split: str, index: int) -> dict:
    """Example `index` of `split`, tokenized."""
    text = text_example(self.name, split, index)
    return {
        "inputs": encode(text["inputs"], self.feature_lengths.get("inputs")),
        "targets": encode(text["targets"], self.feature_lengths.get("targets")),
        "inputs_pretokenized": text["inputs"],
        "targets_pretokenized": text["targets"],
    }

  def decode(self, ids) -> str:
    return decode(ids)

  def postprocess(self, text: str, example: dict, is_target: bool) -> str:
    del example, is_target
    return text

  def score(self, targets, predictions) -> dict:
    return sequence_accuracy(targets, predictions)

  def task_sources(self):
    return [self]

  def eval_sources(self):
    return [self]
