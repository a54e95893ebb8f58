"""SeqIO registration of the debug tasks (`lumenvq_debug_copy`, `lumenvq_debug_reverse`).

The examples come from `lumenvq.data.copy_task` (a pure function of split and
index), through `seqio.FunctionDataSource` and `seqio.ByteVocabulary`, so the
SeqIO pipeline and `copy_task.CopySource` produce the same token ids.
"""

import functools

import seqio
import tensorflow as tf

from lumenvq.data import copy_task, seqio_tasks


def _dataset_fn(split: str, shuffle_files: bool, seed=None, *, task: str) -> tf.data.Dataset:
  del shuffle_files, seed  # One deterministic stream; examples are random already.
  spec = tf.TensorSpec((), tf.string)
  return seqio_tasks.indexed_dataset(
      lambda i: copy_task.text_example(task, split, i),
      copy_task.SPLIT_SIZES[split],
      {"inputs": spec, "targets": spec},
  )


def _register():
  vocabulary = seqio.ByteVocabulary()
  features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
  for name in copy_task.TASKS:
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, task=name), splits=tuple(copy_task.SPLIT_SIZES)
        ),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[copy_task.sequence_accuracy],
    )


_register()
