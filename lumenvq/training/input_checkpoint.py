"""The training input's position, saved with each checkpoint on every process: exact resume
in constant time.

tf.data's iterator checkpointing, as T5X does (`train_ds-<i>-of-<n>` next to its
checkpoints), not grain: the SeqIO tasks are tf.data pipelines, and seqio shuffles with a
tf.data shuffle buffer. Checkpointing their iterators keeps the example order of an
uninterrupted run exactly as before; grain would order examples by its own index shuffle
(another order) and need every task rewritten as a random-access grain source (and grain is
one more dependency). The saved state is the iterator's (the shuffle buffer, the epoch of
`repeat`, the index of the source: `seqio_tasks.indexed_dataset`), so its size is that of
the shuffle buffer, whatever the step. Sources that are a pure function of the example index
(the numpy debug sources) save the number of examples consumed and resume by skipping as many
indices (no example is made for them).

A position also holds the batches this process has pulled but not yet trained on (the
memory host reader reads ahead), so a resumed stream gives those first.

Checkpoints without an `input` item (older ones), saved by another number of processes, or
continued with another stream (another task or split, shuffle, seed, backend, rows per
process: the demo's curriculum switches mixture) resume as before this module: rebuilding the
stream and skipping the consumed examples.
"""

import collections
import dataclasses
import io
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# How many batches a consumer may pull beyond the last one saved (`host_reader` reads ahead
# `read_ahead` batches, 2 by default).
MAX_AHEAD = 64


def to_python(example: dict) -> dict:
  """A numpy example of a tf.data dataset, its byte strings decoded."""
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


class _TfdataBatches:
  """Rows of a tf.data dataset, `n` at a time; `state()` is the iterator's, as bytes.

  The rows are batched inside tf.data (`padded_batch`, each feature padded with zeros / b""
  to the batch's longest) and split into examples here: one iterator step and one tensor
  conversion per batch instead of per example, whose eager overhead alone capped a stream
  at about 7,000 examples/s. The converters cut and pad every feature themselves, so the
  extra trailing zeros change no batch. Batches are never split across calls, so the
  saved state is always at a batch boundary.
  """

  def __init__(self, dataset, n: int, state: Optional[bytes]):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only SeqIO sources need it)

    self._n = n
    self._iterator = iter(dataset.padded_batch(n))
    if state is not None:
      # The iterator's own (de)serialisation, as `tf.train.Checkpoint` calls it, but to and
      # from bytes, so the state travels in an orbax item through any path epath opens.
      self._iterator._restore(tf.constant(state))  # pylint: disable=protected-access

  def take(self) -> list[dict]:
    batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    rows = len(next(iter(batch.values())))
    if rows < self._n:
      raise StopIteration
    return [to_python({k: v[row] for k, v in batch.items()}) for row in range(rows)]

  def state(self) -> bytes:
    return self._iterator._save().numpy()  # pylint: disable=protected-access


class _IndexedExamples:
  """Examples of a source that is a pure function of the index, `n` at a time; the state is
  their count."""

  def __init__(self, examples: Callable, n: int, consumed: int):
    self.consumed, self._n = consumed, n
    self._iterator = examples(skip=consumed)

  def take(self) -> list[dict]:
    rows = [next(self._iterator) for _ in range(self._n)]
    self.consumed += self._n
    return rows

  def state(self) -> bytes:
    return str(self.consumed).encode()


def _pack(arrays: dict) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _unpack(data: bytes) -> dict:
  with np.load(io.BytesIO(data), allow_pickle=False) as stored:
    return {k: stored[k] for k in stored.files}


class CheckpointableBatches:
  """This process's batches for steps start_step+1, start_step+2, ... of `examples` (the
  source's examples(**kwargs) maker) cut into `local_size` rows by `convert`.

  `dataset` (a tf.data dataset maker, for SeqIO sources) or None (index-addressed sources).
  `position(step)`: the bytes a checkpoint at `step` keeps; give them back as `position` to
  continue with batch step+1.
  """

  def __init__(
      self,
      examples: Callable,
      dataset: Optional[Callable],
      convert: Callable,
      local_size: int,
      start_step: int,
      position: Optional[bytes] = None,
      what: str = "the training split",
  ):
    self._convert, self._local_size, self._what = convert, local_size, what
    self._step = start_step  # The step of the last batch handed out.
    self._given = collections.deque(maxlen=MAX_AHEAD)  # (step, batch) handed out lately.
    saved = _unpack(position) if position is not None else None
    kind = "indexed" if dataset is None else "tfdata-batched"
    self._stream = f"{kind} {what}, {local_size} rows per batch"
    if saved is not None and int(saved["step"]) != start_step:
      raise ValueError(
          f"the saved input position is at step {saved['step']}, but this run resumes at "
          f"step {start_step}"
      )
    if saved is not None and str(saved["stream"]) != self._stream:
      # Another task or setting continues the run (the demo's curriculum switches mixture):
      # its stream starts where an uninterrupted stream of its own would be, as before.
      logging.warning(
          "the input position saved at step %d is of %s, not of %s: skipping to the step",
          start_step,
          saved["stream"],
          self._stream,
      )
      saved = None
    self._replay = []
    if saved is None:
      self._skip, state = start_step * local_size, None
    else:
      self._skip, state = int(saved["skip"]), saved["state"].tobytes()
      self._replay = [
          {k[len(f"{j}/") :]: v for k, v in saved.items() if k.startswith(f"{j}/")}
          for j in range(int(saved["pending"]))
      ]
    if dataset is None:
      self._examples = _IndexedExamples(
          examples, local_size, self._skip if state is None else int(state)
      )
    else:
      # The skip of a resume without a saved position stays part of the pipeline: the
      # positions saved later are those of this pipeline.
      self._examples = _TfdataBatches(dataset(self._skip), local_size, state)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._replay:
      batch = self._replay.pop(0)
    else:
      try:
        chunk = self._examples.take()
      except StopIteration:
        raise ValueError(f"{self._what} ran out of examples") from None
      batch = self._convert(chunk)
    self._step += 1
    self._given.append((self._step, batch))
    return batch

  def position(self, step: int) -> bytes:
    """What a checkpoint at `step` keeps: the stream's state and the batches after `step`
    already handed out."""
    pending = [b for s, b in self._given if s > step] + self._replay
    if self._step - step != len(pending) - len(self._replay):
      raise ValueError(
          f"the input stream is at step {self._step}, more than MAX_AHEAD={MAX_AHEAD} "
          f"batches beyond the checkpoint at step {step} (read_ahead too large?)"
      )
    arrays = {
        "stream": np.asarray(self._stream),
        "step": np.asarray(step),
        "skip": np.asarray(self._skip),
        "state": np.frombuffer(self._examples.state(), np.uint8),
        "pending": np.asarray(len(pending)),
    }
    for j, batch in enumerate(pending):
      arrays.update({f"{j}/{k}": np.asarray(v) for k, v in batch.items()})
    return _pack(arrays)


def _file_name() -> str:
  return f"process_{jax.process_index():05d}-of-{jax.process_count():05d}"


class InputPositionHandler(ocp.CheckpointHandler):
  """The orbax item `input`: one file per process (every process writes its own)."""

  def save(self, directory: epath.Path, args: "InputPositionSave"):
    (directory / _file_name()).write_bytes(args.position)

  def restore(self, directory: epath.Path, args: "InputPositionRestore" = None) -> Optional[bytes]:
    """This process's position, or None if saved by another number of processes."""
    del args
    path = directory / _file_name()
    if not path.exists():
      logging.warning(
          "%s has no input position of this process (%s): saved by another number of "
          "processes; the stream skips to the step instead",
          directory,
          _file_name(),
      )
      return None
    return path.read_bytes()


@ocp.args.register_with_handler(InputPositionHandler, for_save=True)
@dataclasses.dataclass
class InputPositionSave(ocp.args.CheckpointArgs):
  position: bytes


@ocp.args.register_with_handler(InputPositionHandler, for_restore=True)
@dataclasses.dataclass
class InputPositionRestore(ocp.args.CheckpointArgs):
  pass
