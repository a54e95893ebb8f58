r"""Evaluate a checkpoint on a task split with the task's metric fns.

    python -m lumenvq.eval --gin_file=gin_configs/runs/eval.gin \
        --gin_file=gin_configs/debug/tiny_task.gin --gin.MODEL_DIR="'/tmp/x'"

Reads MODEL_DIR/checkpoints (latest, or CHECKPOINT_STEP) or a parameter
directory CHECKPOINT_PATH; writes `metrics_<step>.json` and TensorBoard
scalars to EVAL_OUTPUT_DIR (default MODEL_DIR/eval).
"""

import json
from typing import Callable, Optional

import gin
import jax
from absl import logging

from lumenvq import paths
from lumenvq.memory import memory_feed
from lumenvq.model import models, reader_models  # pylint: disable=unused-import  (gin)
from lumenvq.model.network_config import T5Config  # pylint: disable=unused-import  (gin)
from lumenvq.training import checkpoints, evaluation, gin_cli, input_pipeline, partitioning, summaries, trainer as trainer_lib


def inference_setup(model, model_dir, checkpoint_step, checkpoint_path, devices=None):
  """(trainer without optimizer, state without optimizer state, step) on the configured
  mesh (over `devices`, default all); shared with infer and precompute_memory."""
  mesh = partitioning.make_mesh(devices=devices)
  trainer = trainer_lib.Trainer(model, None, mesh, partitioning.standard_logical_axis_rules())
  state, step = checkpoints.load_state(
      trainer.abstract_state(), model_dir, checkpoint_step, checkpoint_path
  )
  return trainer, state, step


def write_json(path: str, obj) -> None:
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


@gin.configurable
def evaluate(
    *,
    model_dir: Optional[str] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    task_feature_lengths: dict = gin.REQUIRED,
    model=gin.REQUIRED,
    source_fn: Callable = input_pipeline.get_source,
    split: str = "validation",
    checkpoint_step: Optional[int] = None,
    checkpoint_path: Optional[str] = None,
    output_dir: Optional[str] = None,
    max_examples: Optional[int] = None,
    write_predictions: bool = True,
) -> dict:
  """Metrics of one checkpoint; returns them and writes them as JSON and TensorBoard,
  and (`write_predictions`) each task's predictions as `<task>-<split>-<step>.jsonl`, in
  KILT's format for KILT tasks (score them with `python -m lumenvq.kilt_eval`)."""
  output_dir = checkpoints.check_writable(output_dir or paths.join(model_dir, "eval"))
  trainer, state, step = inference_setup(model, model_dir, checkpoint_step, checkpoint_path)
  feed = memory_feed.attach(trainer, step)
  source = source_fn(task_feature_lengths=task_feature_lengths)

  def save(task_source, pairs):
    path = paths.join(output_dir, f"{task_source.name}-{split}-{step}.jsonl")
    evaluation.write_predictions(path, task_source, pairs, task_source.is_kilt)

  metrics = evaluation.evaluate(
      trainer,
      state,
      source,
      split,
      batch_size,
      max_examples,
      progress=True,
      prepare=feed.prepare,
      on_predictions=save if write_predictions else None,
  )
  logging.info(
      "eval of step %d on %s:%s: %s", step, source.name, split, json.dumps(metrics, sort_keys=True)
  )
  if jax.process_index() == 0:
    write_json(
        paths.join(output_dir, f"metrics_{step}.json"),
        {"step": step, "task": source.name, "split": split, "metrics": metrics},
    )
  writer = summaries.ScalarWriter(output_dir)
  writer.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
  writer.close()
  return metrics


if __name__ == "__main__":
  gin_cli.run_configurable(evaluate, (checkpoints.CheckpointError, partitioning.PartitioningError))
