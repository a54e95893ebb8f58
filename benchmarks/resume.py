"""Resume time of the training input on the demo task, with and without a saved position.

  python benchmarks/resume.py [--steps 10,1000] [--data demo_out]   (--steps 10,20000: the full figure)

The demo mixture (`lumenvq_demo_all`, shuffled, seed 0, batch 32, one process, the demo
reader's feature converter). For each N: "skip" is a resume without a saved input position
(what every resume did before `input_checkpoint`: rebuild the stream, skip the examples of
the steps before, give the next batch), timed at step N-1; that stream, having given batch N,
gives the position a checkpoint at step N holds (its iterator state is that of any stream at
step N: a shuffle buffer and counters). "position" rebuilds the stream from it and gives
batch N+1, checked equal to the skip stream's batch N+1. Demo data is generated into a temp dir
unless --data names a `make demo` output directory.

Prints a table and writes benchmarks/results/resume.json.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=wrong-import-position

from lumenvq.model import reader_config, reader_models  # pylint: disable=wrong-import-position
from lumenvq.training import input_pipeline  # pylint: disable=wrong-import-position

TASK, LENGTHS, BATCH = "lumenvq_demo_all", {"inputs": 32, "targets": 16}, 32


def _timed_first(make):
  start = time.perf_counter()
  stream = make()
  batch = next(stream)
  return time.perf_counter() - start, stream, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", default="10,1000", help="resume steps N, comma separated")
  report.add_demo_arguments(parser)
  args = parser.parse_args()
  source = report.demo_task_source(args, TASK, LENGTHS)
  reader = reader_config.ReaderConfig()
  convert = reader_models.ReaderFeatureConverter(
      LENGTHS, reader.num_passages, reader.passage_length
  )
  layout = input_pipeline.DataLayout(BATCH, 0, BATCH)
  stream = lambda step, position=None: input_pipeline.train_batches(
      source, convert, layout, step, shuffle=True, seed=0, position=position
  )
  rows = []
  for n in [int(s) for s in args.steps.split(",")]:
    skip_s, at_n, _ = _timed_first(lambda: stream(n - 1))  # Without a position: skips.
    start = time.perf_counter()
    position = at_n.position(n)
    save_s = time.perf_counter() - start
    want = next(at_n)
    position_s, _, got = _timed_first(lambda: stream(n, position))
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {n + 1} {key}")
    print(f"N={n}: skip {skip_s:.2f} s, position {position_s:.2f} s", flush=True)
    rows.append(
        dict(
            step=n,
            examples_skipped=(n - 1) * BATCH,
            skip_s=skip_s,
            position_s=position_s,
            position_bytes=len(position),
            save_position_s=save_s,
        )
    )
  first, last = rows[0], rows[-1]
  ratio = last["position_s"] / first["position_s"]
  for row in rows:
    row["position_vs_first"] = row["position_s"] / first["position_s"]
  report.print_table(
      rows,
      [
          "step",
          "examples_skipped",
          "skip_s",
          "position_s",
          "position_vs_first",
          "position_bytes",
          "save_position_s",
      ],
  )
  print(f"resume at N={last['step']} / at N={first['step']} with a saved position: {ratio:.3f}")
  report.write_results("resume", rows, ratio=ratio, settings=vars(args))


if __name__ == "__main__":
  main()
