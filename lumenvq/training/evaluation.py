"""Decode a task split and score it with the task's metric fns; prediction records.

Used by the periodic eval in training, by `lumenvq.eval` and by
`lumenvq.infer`. Every process walks the whole split and supplies its rows of
each global batch; decoded ids come back replicated, so every process holds
all predictions (process 0 writes them).
"""

import json
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tqdm

from lumenvq import paths
from lumenvq.training import input_pipeline


def predictions(
    trainer,
    state,
    source,
    split: str,
    batch_size: int,
    max_examples: Optional[int] = None,
    progress: bool = False,
    teacher_forced: bool = True,
    prepare: Optional[Callable] = None,
    timing: Optional[dict] = None,
) -> tuple:
  """([(example, decoded text)], teacher-forced metric sums or None) over `split`, with
  the params and model state of `state` (a trainer.TrainState). `prepare` finishes each
  converted batch on the host (stored memory: `memory_feed.MemoryFeed.prepare`).
  `timing` gets "examples" and "seconds" of the batches after the first (which compiles):
  the steady-state cost of reading, decoding and scoring an example."""
  convert = trainer.model.feature_converter(source.feature_lengths)
  examples = list(source.examples(split))
  total = len(examples) if max_examples is None else min(max_examples, len(examples))
  out, sums = [], None
  bar = tqdm.tqdm(
      total=total,
      desc=f"{source.name}:{split}",
      unit="ex",
      disable=not progress or jax.process_index() != 0,
  )
  layout = input_pipeline.data_layout(trainer.mesh, batch_size)
  start = None
  for local, chunk, n in input_pipeline.eval_batches(examples, convert, layout, max_examples):
    if start is None and out:  # Timing starts after the first (compiling) batch.
      start, first = time.perf_counter(), len(out)
    if prepare is not None:
      local = prepare(local)
    batch = input_pipeline.to_global(local, trainer.mesh, batch_size)
    ids = np.asarray(jax.device_get(trainer.predict_batch(state, batch)))
    out.extend((ex, source.decode(row)) for ex, row in zip(chunk, ids[:n]))
    if teacher_forced:
      step_sums = jax.device_get(trainer.eval_step(state, batch))
      sums = step_sums if sums is None else {k: sums[k] + step_sums[k] for k in sums}
    bar.update(n)
  bar.close()
  if timing is not None and start is not None:
    timing.update(examples=len(out) - first, seconds=time.perf_counter() - start)
  return out, sums


def evaluate(
    trainer,
    state,
    source,
    split: str,
    batch_size: int,
    max_examples: Optional[int] = None,
    progress: bool = False,
    prepare: Optional[Callable] = None,
    on_predictions: Optional[Callable] = None,
) -> dict:
  """Task metrics on decoded predictions plus teacher-forced `loss` and `token_accuracy`
  (not `accuracy`: that is FEVER's label accuracy).

  A mixture is scored per task, with metric names prefixed `task/`.
  `on_predictions(task_source, pairs)` sees each task's (example, text) pairs (eval writes
  them as prediction files).
  """
  sources = source.eval_sources()
  results = {}
  for src in sources:
    timing = {}
    pairs, sums = predictions(
        trainer,
        state,
        src,
        split,
        batch_size,
        max_examples,
        progress,
        prepare=prepare,
        timing=timing,
    )
    if on_predictions is not None:
      on_predictions(src, pairs)
    targets = [
        src.postprocess(ex["targets_pretokenized"], example=ex, is_target=True) for ex, _ in pairs
    ]
    preds = [src.postprocess(text, example=ex, is_target=False) for ex, text in pairs]
    metrics = dict(src.score(targets, preds))
    weight = max(float(sums["weight"]), 1e-9)
    metrics.update(
        loss=float(sums["loss"]) / weight,
        token_accuracy=float(sums["correct"]) / weight,
        examples=len(pairs),
    )
    if timing.get("examples"):
      metrics["seconds_per_example"] = timing["seconds"] / timing["examples"]
    prefix = f"{src.name}/" if len(sources) > 1 else ""
    results.update({prefix + k: v for k, v in metrics.items()})
  return results


def write_predictions(path: str, source, pairs, kilt: bool) -> None:
  """`prediction_records` as jsonl at `path`, by rename (process 0 only): a file that
  exists is complete."""
  if jax.process_index() != 0:
    return
  with paths.atomic_open(path) as f:
    for record in prediction_records(source, pairs, kilt):
      f.write(json.dumps(record) + "\n")


def prediction_records(source, pairs, kilt: bool) -> Iterator[dict]:
  """KILT's prediction format `{"id", "output": [{"answer"}]}`, else
  `{"inputs", "prediction", "targets"}`."""
  for example, text in pairs:
    if kilt:
      if "id" not in example:
        raise ValueError(
            f"task {source.name} is written in KILT format but its examples " "have no 'id' feature"
        )
      example_id = example["id"]
      yield {
          "id": example_id.decode() if isinstance(example_id, bytes) else str(example_id),
          "output": [{"answer": text}],
      }
    else:
      yield {
          "inputs": example.get("inputs_pretokenized"),
          "prediction": text,
          "targets": example.get("targets_pretokenized"),
      }
