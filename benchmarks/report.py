"""Shared by the benchmark scripts: timing, a printed table, results JSON, optional PNG."""

import json
import os
import platform
import time

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(fn, *args, repeats: int = 5):
  """(first-call seconds incl. compile, best steady-state seconds) for a jitted fn."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return first, best


def best_times(fns: dict, repeats: int, in_turns: bool = False) -> dict:
  """Best wall time of each fn() over `repeats` calls, after a warm-up call each.

  By default one function's calls run back to back: a library's threads go on spinning
  after a call (OpenMP's for FAISS), and in turns they took the cores of the call timed
  next (our decode measured 2-4x slower right after FAISS's). `in_turns`: the functions take
  turns call by call, for work whose data a repeat would otherwise find in the cache the
  previous repeat warmed. `best_of_rounds` repeats either, so that load from other
  processes hits them alike.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  best = {k: float("inf") for k in fns}
  order = (
      [k for _ in range(repeats) for k in fns]
      if in_turns
      else [k for k in fns for _ in range(repeats)]
  )
  for k in order:
    start = time.perf_counter()
    jax.block_until_ready(fns[k]())
    best[k] = min(best[k], time.perf_counter() - start)
  return best


def best_of_rounds(make_fns, rounds: int, repeats: int) -> dict:
  """`best_times` of `make_fns()` over `rounds` rounds, each building the functions anew.

  Calls of a millisecond or less, here, can sit 2x off their best for every repeat at one
  placement of their input and output buffers (numpy's and XLA's alike): each round's
  `make_fns` gives them fresh copies of their inputs, and the best round counts.
  """
  best = {}
  for _ in range(rounds):
    for k, v in best_times(make_fns(), repeats).items():
      best[k] = min(v, best.get(k, v))
  return best


def print_table(rows, columns):
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e3 else f"{v:,.0f}"
  return str(v)


def write_results(name: str, rows, **extra) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  payload = {
      "benchmark": name,
      "machine": {
          "platform": platform.platform(),
          "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()],
      },
      "rows": rows,
      **extra,
  }
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(path + ".tmp", path)
  print(f"wrote {path}")
  return path


def bar_plot(name: str, labels, series: dict, ylabel: str, log: bool = False) -> str:
  """Grouped bars: one group per label, one bar per series entry."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / max(len(series), 1)
  for i, (key, values) in enumerate(series.items()):
    ax.bar([x + i * width for x in range(len(labels))], values, width, label=key)
  ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))])
  ax.set_xticklabels(labels)
  ax.set_ylabel(ylabel)
  if log:
    ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(RESULTS_DIR, f"{name}.png")
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")
  return path


def add_demo_arguments(parser, **defaults) -> None:
  """The demo world's data settings (`lumenvq.demo`'s), and --data for a ready one."""
  from lumenvq import demo  # pylint: disable=g-import-not-at-top

  parser.add_argument("--data", default=None, help="a demo output dir (else generated)")
  demo.add_arguments(parser)
  parser.set_defaults(**defaults)


def demo_task_source(args, task: str, lengths: dict):
  """The SeqIO source of demo task `task` over `args.data`, or over demo data generated
  into a temp dir with `args`' settings."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from lumenvq import demo  # pylint: disable=g-import-not-at-top
  from lumenvq.training import input_pipeline  # pylint: disable=g-import-not-at-top

  out = args.data or tempfile.mkdtemp(prefix="demo_bench_")
  if not args.data:
    demo.prepare_data(out, args)
  os.environ["LUMENVQ_DEMO_DIR"] = os.path.join(out, "data")
  return input_pipeline.SeqioSource(task, lengths)
