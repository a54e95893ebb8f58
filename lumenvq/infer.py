r"""Decode a task split with a checkpoint and write one jsonl line per example.

    python -m lumenvq.infer --gin_file=gin_configs/runs/infer.gin \
        --gin_file=gin_configs/debug/tiny_task.gin --gin.MODEL_DIR="'/tmp/x'"

KILT tasks get KILT's prediction format `{"id", "output": [{"answer"}]}`
(ready for `lumenvq.kilt_eval`); other tasks `{"inputs", "prediction",
"targets"}`. Output: INFER_OUTPUT_DIR (default MODEL_DIR/infer) /
`<task>-<split>-<step>.jsonl`, one file per task of a mixture. The decoding
function is `EncoderDecoderModel.decode_fn` in gin.
"""

from typing import Callable, Optional

import gin
from absl import logging

from lumenvq import paths
from lumenvq.eval import inference_setup
from lumenvq.memory import memory_feed
from lumenvq.training import checkpoints, evaluation, gin_cli, input_pipeline, partitioning


@gin.configurable
def infer(
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
    output_format: str = "auto",
    max_examples: Optional[int] = None,
) -> list:
  """Writes the predictions; returns the paths. `output_format`: auto, kilt or plain."""
  if output_format not in ("auto", "kilt", "plain"):
    raise ValueError(f"infer.output_format must be auto, kilt or plain, not {output_format!r}")
  output_dir = checkpoints.check_writable(output_dir or paths.join(model_dir, "infer"))
  trainer, state, step = inference_setup(model, model_dir, checkpoint_step, checkpoint_path)
  feed = memory_feed.attach(trainer, step)
  written = []
  for source in source_fn(task_feature_lengths=task_feature_lengths).task_sources():
    pairs, _ = evaluation.predictions(
        trainer,
        state,
        source,
        split,
        batch_size,
        max_examples,
        progress=True,
        teacher_forced=False,
        prepare=feed.prepare,
    )
    kilt = source.is_kilt if output_format == "auto" else output_format == "kilt"
    path = paths.join(output_dir, f"{source.name}-{split}-{step}.jsonl")
    evaluation.write_predictions(path, source, pairs, kilt)
    logging.info("wrote %d predictions of step %d to %s", len(pairs), step, path)
    written.append(path)
  return written


if __name__ == "__main__":
  gin_cli.run_configurable(infer, (checkpoints.CheckpointError, partitioning.PartitioningError))
