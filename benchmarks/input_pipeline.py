"""Input throughput per host: examples/s of kilt_nq-shaped training input.

  python benchmarks/input_pipeline.py [--batches 40] [--warmup 40] [--words 190] [--data DIR]

The demo world's `lumenvq_demo_nq` task (one process, batch 32, shuffled, seed 0) with
K = 20 retrieved passages, the reader's passage length 256: the shape of `kilt_nq` training
input, except that passages are only as long as the demo world's paragraphs (--words caps
them; the run prints the measured mean, about 37 tokens, where KILT's 100-word passages have
about 150). Stages, each timed through the
training stream (`input_pipeline.train_batches`) after --warmup batches (the shuffle buffer
filled), in examples/s:

  source      the task's source only: KILT record + retrieval ids + passage texts (no seqio)
  seqio       + tokenization of question, answer and the 20 passages (seqio preprocessors)
  tokens      + the reader's feature converter cutting passages to 256 tokens: the token path
  tokens, pre-tokenized   the token path over passages tokenized once ahead
              (`lumenvq.data.passage_tokens`, built here into a temporary directory and timed:
              the build's passages/s is printed); the passages are looked up by id
  seqio, no passage texts   the task's examples as the stored-memory path builds them
              (`seqio_tasks.without_passage_texts`: passage ids, no texts, no passage tokens)
  ids         + the feature converter: the stored-memory path

Prints a table and writes benchmarks/results/input_pipeline.json.
"""

import argparse
import itertools
import os
import sys
import tempfile
import time

import gin

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=wrong-import-position

from lumenvq.data import passage_tokens  # pylint: disable=wrong-import-position
from lumenvq.model import reader_models  # pylint: disable=wrong-import-position
from lumenvq.training import input_pipeline  # pylint: disable=wrong-import-position

TASK, LENGTHS, BATCH, K, PASSAGE_LENGTH = (
    "lumenvq_demo_nq",
    {"inputs": 32, "targets": 16},
    32,
    20,
    256,
)
PRETOKENIZED = "tokens, pre-tokenized"


def _rate(stream, warmup: int, batches: int) -> float:
  for _ in range(warmup):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * BATCH / (time.perf_counter() - start)


def _batches(dataset):
  """Batches of BATCH examples as numpy (the stages before the feature converter), read as
  the training stream reads them (`input_checkpoint`: batched inside tf.data)."""
  for batch in dataset.padded_batch(BATCH):
    yield {k: v.numpy() for k, v in batch.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=40, help="timed batches per stage")
  parser.add_argument("--warmup", type=int, default=40, help="untimed batches first")
  report.add_demo_arguments(parser, words=190)
  args = parser.parse_args()
  source = report.demo_task_source(args, TASK, LENGTHS)
  task = source.provider
  kwargs = dict(shuffle=True, seed=0, repeat=True)
  layout = input_pipeline.DataLayout(BATCH, 0, BATCH)

  def stream(passage_ids):
    convert = reader_models.ReaderFeatureConverter(LENGTHS, K, PASSAGE_LENGTH, passage_ids)
    return input_pipeline.train_batches(source, convert, layout, 0, shuffle=True, seed=0)

  import tasks.demo  # pylint: disable=g-import-not-at-top  (registers the tasks, after the env var)

  settings = tasks.demo.demo_data()
  built_at = tempfile.mkdtemp(prefix="passage_tokens_")
  start = time.perf_counter()
  passage_tokens.build(settings.passages_dir, settings.vocabulary_path, built_at, progress=False)
  build_rate = len(settings.passage_table()) / (time.perf_counter() - start)

  raw = task.source.get_dataset("train", shuffle=False).repeat()
  real = (e for e in source.examples("train") if e["passage_ids"][0] >= 0)
  tokens_per_passage = np.mean(
      [(np.asarray(e["passage_tokens"]) > 0).sum(-1).mean() for e in itertools.islice(real, 100)]
  )
  stages = {  # Each made when it runs: the pre-tokenized stage binds where the tokens are.
      "source": lambda: _batches(raw),
      "seqio": lambda: _batches(source.dataset("train", **kwargs)),
      "tokens": lambda: stream(False),
      PRETOKENIZED: lambda: stream(False),
      "seqio, no passage texts": lambda: _batches(
          source.dataset("train", passage_texts=False, **kwargs)
      ),
      "ids": lambda: stream(True),
  }
  rows = []
  for name, make in stages.items():
    gin.bind_parameter("demo_data.passage_tokens_dir", built_at if name == PRETOKENIZED else None)
    rate = _rate(make(), args.warmup, args.batches)
    rows.append(dict(stage=name, examples_per_s=rate, cores=os.cpu_count()))
  report.print_table(rows, ["stage", "examples_per_s", "cores"])
  print(f"K={K} passages per example, {tokens_per_passage:.0f} tokens per passage on average")
  print(f"passage_tokens.build: {build_rate:,.0f} passages/s")
  report.write_results(
      "input_pipeline",
      rows,
      tokens_per_passage=float(tokens_per_passage),
      passage_tokens_build_per_s=build_rate,
      settings=vars(args),
  )


if __name__ == "__main__":
  main()
