"""Input pipeline: resumption skips to the step, process shards make up the global
batch, eval batches are padded, and the SeqIO debug task gives exactly the
numpy source's examples (so tests may use the fast path)."""

import itertools

import numpy as np
import pytest

from lumenvq.data import copy_task
from lumenvq.model import models
from lumenvq.training import input_pipeline, partitioning

LENGTHS = {"inputs": 8, "targets": 8}
CONVERT = models.EncDecFeatureConverter(LENGTHS)


def _source(name="lumenvq_debug_copy"):
  return copy_task.CopySource(name, LENGTHS)


def test_resumed_stream_continues_where_the_run_stopped():
  layout = input_pipeline.data_layout(partitioning.make_mesh((4, 2)), 16)
  assert (layout.start, layout.stop, layout.num_shards, layout.shard_index) == (0, 16, 1, 0)
  fresh = list(itertools.islice(input_pipeline.train_batches(_source(), CONVERT, layout, 0), 4))
  resumed = next(input_pipeline.train_batches(_source(), CONVERT, layout, 2))
  for key in fresh[2]:
    np.testing.assert_array_equal(resumed[key], fresh[2][key])
  assert not np.array_equal(fresh[2]["encoder_input_tokens"], fresh[3]["encoder_input_tokens"])


def test_process_shards_make_up_the_global_batch():
  whole = [
      e["inputs_pretokenized"] for e in itertools.islice(_source().examples("train", skip=8), 8)
  ]
  shards = [
      [
          e["inputs_pretokenized"]
          for e in itertools.islice(
              _source().examples("train", shard_index=i, num_shards=2, skip=4), 4
          )
      ]
      for i in range(2)
  ]
  assert sorted(shards[0] + shards[1]) == sorted(whole)
  assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_eval_batches_pad_the_last_batch_with_empty_rows():
  layout = input_pipeline.data_layout(partitioning.make_mesh((8, 1)), 16)
  examples = list(_source().examples("validation"))[:20]
  batches = list(input_pipeline.eval_batches(examples, CONVERT, layout))
  assert [n for _, _, n in batches] == [16, 4]
  last, chunk, _ = batches[1]
  assert len(chunk) == 4 and last["decoder_loss_weights"].shape == (16, 8)
  assert last["decoder_loss_weights"][4:].sum() == 0 and last["decoder_loss_weights"][:4, 0].all()


def test_kilt_task_names_are_recognised():
  assert input_pipeline._is_kilt_name("nq") and input_pipeline._is_kilt_name("kilt_fever")
  assert not input_pipeline._is_kilt_name("lumenvq_debug_copy")


def test_seqio_task_gives_the_numpy_sources_examples():
  seqio_source = input_pipeline.get_source("lumenvq_debug_reverse", LENGTHS, backend="seqio")
  numpy_source = input_pipeline.get_source("lumenvq_debug_reverse", LENGTHS, backend="numpy")
  assert not seqio_source.is_kilt
  kwargs = dict(shard_index=1, num_shards=2, repeat=True, skip=3)
  got = list(itertools.islice(seqio_source.examples("train", **kwargs), 6))
  want = list(itertools.islice(numpy_source.examples("train", **kwargs), 6))
  for g, w in zip(got, want):
    assert g["inputs_pretokenized"] == w["inputs_pretokenized"]
    assert g["targets_pretokenized"] == w["targets_pretokenized"] == w["inputs_pretokenized"][::-1]
    np.testing.assert_array_equal(g["inputs"], w["inputs"])
    np.testing.assert_array_equal(g["targets"], w["targets"])
  assert max(len(w["inputs"]) for w in want) <= LENGTHS["inputs"]  # Trimmed, EOS kept.
  assert all(w["inputs"][-1] == copy_task.EOS_ID for w in want)
  assert len(list(seqio_source.examples("validation"))) == copy_task.SPLIT_SIZES["validation"]
  ids = [ord("a") + 3, ord("b") + 3, copy_task.EOS_ID, ord("c") + 3, 0]
  assert seqio_source.decode(ids) == numpy_source.decode(ids) == "ab"
  targets, predictions = ["abc", "de"], ["abc", "xy"]
  assert (
      seqio_source.score(targets, predictions)
      == numpy_source.score(targets, predictions)
      == {"sequence_accuracy": 50.0}
  )
  with pytest.raises(ValueError, match="CopySource serves only the debug tasks"):
    input_pipeline.get_source("nq", LENGTHS, backend="numpy")


def test_seqio_source_after_gin_is_locked():
  """The CLIs lock gin before the task modules are imported; their settings
  (`demo_data`, `kilt_data`) must still register."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = (
      "import gin; from lumenvq.training import input_pipeline; gin.finalize(); "
      "s = input_pipeline.SeqioSource('lumenvq_debug_copy', {'inputs': 8, 'targets': 8}); "
      "print(next(iter(s.examples('validation')))['inputs'][:3])"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
