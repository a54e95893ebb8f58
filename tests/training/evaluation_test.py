"""Prediction records: KILT's format for KILT tasks, inputs/prediction/targets otherwise."""

import pytest

from lumenvq.data import copy_task
from lumenvq.training import evaluation


def test_kilt_and_plain_prediction_records():
  source = copy_task.CopySource("lumenvq_debug_copy", {"inputs": 8, "targets": 8})
  pairs = [({"id": b"q17", "inputs_pretokenized": "who?", "targets_pretokenized": "me"}, "you")]
  assert list(evaluation.prediction_records(source, pairs, kilt=True)) == [
      {"id": "q17", "output": [{"answer": "you"}]}
  ]
  assert list(evaluation.prediction_records(source, pairs, kilt=False)) == [
      {"inputs": "who?", "prediction": "you", "targets": "me"}
  ]
  with pytest.raises(ValueError, match="lumenvq_debug_copy .* no 'id' feature"):
    list(evaluation.prediction_records(source, [({"inputs_pretokenized": "x"}, "y")], kilt=True))
