"""Input positions: a stream restored from `position(step)` gives exactly the batches of an
uninterrupted stream after `step` (shuffled SeqIO pipeline, numpy source, each of two data
shards, batches pulled ahead), the position does not grow with the step, and two training
processes killed with -9 resume from their saved positions to the uninterrupted run's
parameters.
"""

import itertools

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lumenvq.model import models
from lumenvq.training import checkpoints, input_checkpoint, input_pipeline

LENGTHS = {"inputs": 8, "targets": 8}
CONVERT = models.EncDecFeatureConverter(LENGTHS)
SHUFFLED = dict(shuffle=True, seed=7)


@pytest.fixture(scope="module")
def seqio_source():
  return input_pipeline.get_source("lumenvq_debug_copy", LENGTHS, backend="seqio")


def _layout(num_shards=1, shard_index=0, batch_size=8):
  local = batch_size // num_shards
  return input_pipeline.DataLayout(batch_size, shard_index * local, (shard_index + 1) * local)


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def _resumed(source, layout, step, pulled, count):
  """`count` batches after `step` from a stream that had pulled `pulled` >= step batches."""
  stream = input_pipeline.train_batches(source, CONVERT, layout, 0, **SHUFFLED)
  list(itertools.islice(stream, pulled))
  position = stream.position(step)
  resumed = input_pipeline.train_batches(
      source, CONVERT, layout, step, position=position, **SHUFFLED
  )
  return list(itertools.islice(resumed, count)), position


@pytest.mark.parametrize("shard_index", [0, 1])
def test_shuffled_seqio_stream_resumes_exactly_on_each_shard(seqio_source, shard_index):
  layout = _layout(2, shard_index)
  want = list(
      itertools.islice(
          input_pipeline.train_batches(seqio_source, CONVERT, layout, 0, **SHUFFLED), 9
      )
  )
  got, _ = _resumed(seqio_source, layout, 3, 5, 6)  # Batches 4, 5 pulled ahead (read-ahead).
  _assert_same(got, want[3:9])
  skipped = input_pipeline.train_batches(seqio_source, CONVERT, layout, 3, **SHUFFLED)
  _assert_same(list(itertools.islice(skipped, 6)), want[3:9])  # Without a position: skips.


def test_position_does_not_grow_with_the_step(seqio_source):
  layout = _layout()
  _, early = _resumed(seqio_source, layout, 2, 2, 1)
  _, late = _resumed(seqio_source, layout, 60, 60, 1)
  # tf.data's prefetch buffers fill on their own threads, so a position's size moves with the
  # load of the machine (here 72 KB to 521 KB between runs); what must not happen is growth
  # with the step, which 30x more steps would show as a larger factor than this.
  assert len(late) < 10 * len(early)


def test_numpy_source_resumes_exactly():
  source = input_pipeline.get_source("lumenvq_debug_reverse", LENGTHS, backend="numpy")
  layout = _layout(2, 1)
  want = list(itertools.islice(input_pipeline.train_batches(source, CONVERT, layout, 0), 7))
  got, _ = _resumed(source, layout, 2, 4, 5)
  _assert_same(got, want[2:7])


def test_position_of_another_step_is_refused(seqio_source):
  layout = _layout()
  stream = input_pipeline.train_batches(seqio_source, CONVERT, layout, 0)
  next(stream)
  with pytest.raises(ValueError, match="position is at step 1, but this run resumes at step 2"):
    input_pipeline.train_batches(seqio_source, CONVERT, layout, 2, position=stream.position(1))


def test_another_stream_skips_to_the_step_as_before(seqio_source):
  """A run continued on another task or setting (the demo's curriculum switches mixture)."""
  layout = _layout()
  stream = input_pipeline.train_batches(seqio_source, CONVERT, layout, 0)
  next(stream)
  position = stream.position(1)
  for source, kwargs in [
      (input_pipeline.get_source("lumenvq_debug_reverse", LENGTHS, backend="seqio"), {}),
      (seqio_source, SHUFFLED),
      (input_pipeline.get_source("lumenvq_debug_copy", LENGTHS, backend="numpy"), {}),
  ]:
    skipped = input_pipeline.train_batches(source, CONVERT, layout, 1, **kwargs)
    resumed = input_pipeline.train_batches(source, CONVERT, layout, 1, position=position, **kwargs)
    _assert_same([next(resumed), next(resumed)], [next(skipped), next(skipped)])


def test_checkpointer_keeps_the_position_per_process(tmp_path, seqio_source):
  stream = input_pipeline.train_batches(seqio_source, CONVERT, _layout(), 0)
  next(stream)
  # Taken once: each call serializes tf.data's prefetch buffers, which fill on their own threads.
  position = stream.position(1)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, async_save=False)
  ckpt.manager.save(
      1,
      args=ocp.args.Composite(
          input=input_checkpoint.InputPositionSave(position),
          params=ocp.args.StandardSave({"params": {"w": np.ones(2)}}),
      ),
  )
  ckpt.wait()
  assert (tmp_path / "1" / "input" / "process_00000-of-00001").exists()
  assert ckpt.restore_input_position(1) == position
  ckpt.close()
