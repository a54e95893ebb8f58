r"""Train a model on a SeqIO task or mixture, T5X-style.

    python -m lumenvq.train --gin_file=gin_configs/debug/tiny_train.gin \
        --gin.MODEL_DIR="'/tmp/x'" --gin.TRAIN_STEPS=20

Resumes from the latest checkpoint in MODEL_DIR/checkpoints, the data stream
from the position saved with it (`training/input_checkpoint.py`). SIGTERM
saves a checkpoint at the current step and exits 0 (one that comes before
the first step: after that step). A non-finite loss, gradient or parameter
norm stops with the step number before anything from that step is saved, so
the last good checkpoint stays the latest. MODEL_DIR gets config.gin, checkpoints/, and TensorBoard events
in train/ and eval/.
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
from lumenvq.training import checkpoints, evaluation, gin_cli, input_pipeline, optimizers, partitioning, summaries, trainer as trainer_lib


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or inf; the message names the first bad step."""


def _check_finite(pending: list) -> None:
  for step, finite in zip([s for s, _ in pending], jax.device_get([f for _, f in pending])):
    if not finite:
      raise NonFiniteError(
          f"loss, gradient or parameters became NaN/inf at step {step}; "
          "nothing from that step on was saved"
      )
  pending.clear()


def _initial_state(trainer, ckpt, initial_checkpoint_path, train_steps, fallback_to_scratch):
  start = ckpt.latest_step()
  if start is not None:
    logging.info(
        "Restoring checkpoint %s/%d; continuing from step %d to TRAIN_STEPS=%d",
        ckpt.directory,
        start,
        start,
        train_steps,
    )
    return ckpt.restore(trainer.abstract_state(), start), start
  if initial_checkpoint_path:
    logging.info("Initialising parameters from %s", initial_checkpoint_path)
    fresh = trainer.init_state().params if fallback_to_scratch else None
    params = checkpoints.restore_param_dir(
        initial_checkpoint_path, trainer.abstract_state().params, fresh
    )
    return trainer.init_state(params), 0
  logging.info("No checkpoint in %s: starting from step 0", ckpt.directory)
  return trainer.init_state(), 0


@gin.configurable
def train(
    *,
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    task_feature_lengths: dict = gin.REQUIRED,
    model=gin.REQUIRED,
    source_fn: Callable = input_pipeline.get_source,
    optimizer: Optional[optimizers.Optimizer] = None,
    shuffle: bool = True,
    seed: int = 0,
    eval_every: int = 0,
    eval_split: str = "validation",
    eval_batch_size: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
    initial_checkpoint_path: Optional[str] = None,
    fallback_to_scratch: bool = False,
) -> int:
  """Trains to `train_steps`; returns the step reached (lower when preempted).

  `fallback_to_scratch`: parameters `initial_checkpoint_path` lacks start fresh (T5X's
  RestoreCheckpointConfig.fallback_to_scratch; e.g. a pruned reader's importance head when
  it starts from LUMEN) instead of being an error."""
  model_dir = checkpoints.check_writable(model_dir)
  mesh = partitioning.make_mesh()
  rules = partitioning.standard_logical_axis_rules()
  layout = input_pipeline.data_layout(mesh, batch_size)
  trainer = trainer_lib.Trainer(model, optimizer or optimizers.make_optimizer(), mesh, rules)
  ckpt = checkpoints.Checkpointer(paths.join(model_dir, "checkpoints"))
  logger = summaries.MetricsLogger(paths.join(model_dir, "train"))
  eval_writer = summaries.ScalarWriter(paths.join(model_dir, "eval")) if eval_every else None
  # Installed first: a SIGTERM while restoring, building the data or compiling the first
  # step stops the run after that step, with a checkpoint, as one during training does.
  watcher = checkpoints.PreemptionWatcher()
  try:
    feed = memory_feed.attach(trainer)  # Stored memory: its table, codebooks, host reads.
    state, step = _initial_state(
        trainer, ckpt, initial_checkpoint_path, train_steps, fallback_to_scratch
    )
    source = source_fn(task_feature_lengths=task_feature_lengths)
    stream = input_pipeline.train_batches(
        source,
        model.feature_converter(task_feature_lengths),
        layout,
        step,
        shuffle=shuffle,
        seed=seed,
        position=ckpt.restore_input_position(step) if step else None,
    )
    batches = feed.wrap(stream)
    gin_cli.write_config(model_dir)
    pending = []
    logger.start()
    while step < train_steps:
      state, metrics = trainer.train_step(
          state, input_pipeline.to_global(next(batches), mesh, batch_size)
      )
      step += 1
      logger.record(metrics)
      pending.append((step, metrics["finite"]))
      preempted = watcher.reached(step)
      save = preempted or step == train_steps or ckpt.should_save(step)
      if save or logger.due(step):
        _check_finite(pending)
      if logger.due(step):
        logger.write(step)
      if save:
        ckpt.save(step, state, stream.position(step))
      if preempted:
        logging.warning("Preempted: saved a checkpoint at step %d; exiting", step)
        break
      if eval_every and step % eval_every == 0:
        with logger.untimed():
          metrics = evaluation.evaluate(
              trainer,
              state,
              source,
              eval_split,
              eval_batch_size or batch_size,
              max_eval_examples,
              prepare=feed.prepare,
          )
          eval_writer.write(step, metrics)
          logging.info("eval at step %d: %s", step, json.dumps(metrics, sort_keys=True))
    else:
      logging.info("At step %d of TRAIN_STEPS=%d: done", step, train_steps)
    return step
  finally:
    watcher.close()
    ckpt.wait()  # Saves already started are of good states: let them finish.
    ckpt.close()
    logger.close()
    if eval_writer:
      eval_writer.close()


if __name__ == "__main__":
  gin_cli.run_configurable(
      train, (NonFiniteError, checkpoints.CheckpointError, partitioning.PartitioningError)
  )
