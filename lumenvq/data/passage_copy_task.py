"""The debug reader task `lumenvq_debug_passage_copy`: the question is a key word, every
retrieved passage starts with a key and a value word, and the answer is the value of the
first passage, whose key is the question's. Needs no downloaded data.

The answer is a span of the first passage only, and the readers see passages as a set
(the decoder cross-attends to all of them, without order), so a model can only answer by
reading passages and matching their key to the question. The last distractor is missing
from one example in four and passages run longer than a tiny reader's passage length, so
batches exercise the converter's padding and truncation. Examples are pure functions of
(split, index), like `copy_task`'s, in the same byte vocabulary, served by
`PassageCopySource` (the `copy_task.CopySource` interface, plus `passage_tokens`).
"""

import gin
import numpy as np

from lumenvq.data import copy_task

TASKS = ("lumenvq_debug_passage_copy",)
NUM_PASSAGES = 3
_SPLIT_SEEDS = {"train": 11, "validation": 12}
WORD_LENGTHS = (3, 5)
FILLER_WORDS = 3  # After key and value: passages of ~20 bytes.


def _words(rng, n: int) -> list:
  """n distinct random lowercase words."""
  words = []
  while len(words) < n:
    word = "".join(
        rng.choice(
            list(copy_task.ALPHABET), size=rng.integers(WORD_LENGTHS[0], WORD_LENGTHS[1] + 1)
        )
    )
    if word not in words:
      words.append(word)
  return words


def text_example(split: str, index: int) -> dict:
  """{"inputs": key, "targets": value, "passages": ["key value filler...", ...]}."""
  if split not in _SPLIT_SEEDS:
    raise ValueError(
        f"debug task lumenvq_debug_passage_copy has no split {split!r}; it has "
        f"{sorted(_SPLIT_SEEDS)}"
    )
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  keys, values = _words(rng, NUM_PASSAGES), _words(rng, NUM_PASSAGES)
  count = NUM_PASSAGES - 1 if rng.random() < 0.25 else NUM_PASSAGES
  passages = [" ".join([keys[i], values[i]] + _words(rng, FILLER_WORDS)) for i in range(count)]
  return {"inputs": keys[0], "targets": values[0], "passages": passages}


@gin.configurable
class PassageCopySource(copy_task.CopySource):
  """`lumenvq_debug_passage_copy` from numpy; passages are not cut (the converter does)."""

  TASKS = TASKS

  def example(self, split: str, index: int) -> dict:
    text = text_example(split, index)
    return {
        "inputs": copy_task.encode(text["inputs"], self.feature_lengths.get("inputs")),
        "targets": copy_task.encode(text["targets"], self.feature_lengths.get("targets")),
        "passage_tokens": [copy_task.encode(p, None) for p in text["passages"]],
        "inputs_pretokenized": text["inputs"],
        "targets_pretokenized": text["targets"],
    }
