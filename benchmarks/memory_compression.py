"""Past MEMORY-VQ's 16x: demo-task quality against stored bytes per memory token, and
MEMORY-VQ's ablations at small scale. One run, every model with benchmarks/quality.py's
recipe (gin_configs/demo, the demo world, LUMEN trained first):

    python benchmarks/memory_compression.py [--out demo_out] [--only frontier|ablations]

Frontier (every model from the trained LUMEN checkpoint, `--vq_steps` more steps, as
MEMORY-VQ does): product quantization at 8x / 16x / 32x / 64x over bf16 (32 / 16 / 8 / 4
subspaces of 256 codes), residual PQ (2 stages), and token pruning + PQ at the 32x and 64x
byte budgets (`ReaderConfig.token_pruning`: learned keep-score, VQ-LM score, first tokens,
random; the budget, a share of each passage's real tokens, is the largest that fits), with
LUMEN, LUMEN trained `--vq_steps` more (as long as the compressed models) and LUMEN-Light
(first quarter of the slots, bf16) as references. Bytes per memory token
count everything a stored token costs (codes, and each kept token's position) per *real*
token of the demo passages (a third of their 48 slots are padding, which a ragged store need
not keep: counted per slot, dropping it would read as compression); each LUMEN-VQ model's store
is precomputed and measured on disk too (metadata and codebooks included), its lengths are
checked against the reader's kept tokens, and its codes give the codebook usage and
perplexity per subspace. LUMEN-VQ at 16x is trained with
three seeds: their spread says which differences are results.

Ablations (MEMORY-VQ's table): LUMEN-VQ trained jointly (the 16x frontier model), with the
memory encoder frozen, with only the codebooks trained (every parameter frozen), and from
scratch (the demo curriculum, no LUMEN); C = 256 vs 4,096 codes at equal bytes (16 subspaces
of uint8 codes vs 8 of uint16); scale-down baselines (LUMEN with d = 64 and 32 from scratch:
2x and 4x fewer bytes as bf16); dead-code resets over the run (from its TensorBoard log).

Every stage is skipped when its output exists (checkpoints, metrics, COMPLETE), so a rerun
resumes. About 90 minutes on 2 cores from nothing; the demo's LUMEN and LUMEN-VQ are reused.
Writes benchmarks/results/memory_compression.json and memory_compression.png (the Pareto curve).
"""

import argparse
import glob
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.chdir(REPO)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import quality  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq.memory import memory_store  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq.model import reader_models, token_pruning  # pylint: disable=g-import-not-at-top,wrong-import-position

BF16_BYTES = 256  # d = 128 in bf16 per memory token.


def _pq(subspaces, residual=1, codes=256):
  return [
      f"ReaderConfig.num_subspaces = {subspaces}",
      f"ReaderConfig.num_residual = {residual}",
      f"ReaderConfig.codebook_size = {codes}",
  ]


def _pruned(method):
  return ["ReaderConfig.token_pruning = @TokenPruning()", f"TokenPruning.method = '{method}'"]


FALLBACK = ["train.fallback_to_scratch = True"]  # The importance head is new.


def _experiment(
    name, group, gin, bindings=(), start="lumen", train_bindings=(), seed=0, pruned_to=None
):
  """`pruned_to`: the compression over bf16 the pruning budget is chosen for (`_budget`)."""
  return dict(
      name=name,
      group=group,
      gin=gin,
      bindings=list(bindings),
      start=start,
      train_bindings=list(train_bindings) + ([f"train.seed = {seed}"] if seed else []),
      seed=seed,
      pruned_to=pruned_to,
  )


# Pruned: 16 codes + a position per kept token, the budget the largest share of each passage's
# real tokens that stays within 32x (64x): 45% (22%) on the demo passages.
FRONTIER = [
    _experiment("lumen", "reference", "lumen", start="scratch"),
    # LUMEN trained the compressed models' vq_steps more: how much of a gap is training length.
    _experiment("lumen_continued", "reference", "lumen"),
    _experiment("lumen_light_4x", "reference", "lumen_light"),
    _experiment("pq_8x", "pq", "lumen_vq", _pq(32)),
    _experiment("pq_16x", "pq", "lumen_vq", _pq(16)),
    _experiment("pq_16x_seed1", "pq", "lumen_vq", _pq(16), seed=1),
    _experiment("pq_16x_seed2", "pq", "lumen_vq", _pq(16), seed=2),
    _experiment("pq_32x", "pq", "lumen_vq", _pq(8)),
    _experiment("pq_64x", "pq", "lumen_vq", _pq(4)),
    _experiment("residual_pq_16x", "residual_pq", "lumen_vq", _pq(8, residual=2)),
    _experiment("residual_pq_32x", "residual_pq", "lumen_vq", _pq(4, residual=2)),
    *[
        _experiment(
            f"pruned_{method}_{ratio}x",
            f"pruned_{method}",
            "lumen_vq",
            _pq(16) + _pruned(method),
            train_bindings=FALLBACK,
            pruned_to=ratio,
        )
        for ratio, methods in (
            (32, ("learned", "vq_lm", "first", "random")),
            (64, ("learned", "vq_lm", "first")),
        )
        for method in methods
    ],
]
ABLATIONS = [
    _experiment(
        "vq_frozen_memory_encoder",
        "ablation",
        "lumen_vq",
        _pq(16) + ["ReaderConfig.freeze_memory_encoder = True"],
    ),
    _experiment(
        "vq_codebooks_only",
        "ablation",
        "lumen_vq",
        _pq(16),
        train_bindings=["make_optimizer.frozen_patterns = ['.*']"],
    ),
    _experiment("vq_from_scratch", "ablation", "lumen_vq", _pq(16), start="scratch"),
    _experiment("vq_c4096_16x", "ablation", "lumen_vq", _pq(8, codes=4096)),
    *[
        _experiment(
            f"lumen_d{d}",
            "scale_down",
            "lumen",
            [
                f"T5Config.emb_dim = {d}",
                f"T5Config.head_dim = {d // 4}",
                f"T5Config.mlp_dim = {2 * d}",
            ],
            start="scratch",
        )
        for d in (64, 32)
    ],
]
DEMO_DIRS = {"lumen": "lumen", "pq_16x": "lumen_vq"}  # Trained by `make demo` already.


def _flags(bindings):
  return [f"--gin.{b.replace(' = ', '=')}" for b in bindings]


def _budget(ratio, gin_file, bindings, real_tokens) -> float:
  """The largest pruning budget (a multiple of 0.005) whose memory stays within `ratio` over
  bf16 per real token of these passages."""
  per_kept, _ = quality.storage(gin_file, bindings + ["TokenPruning.budget = 1.0"], real_tokens)
  for budget in np.arange(200, 0, -1) / 200:
    kept = token_pruning.TokenPruning(budget=float(budget)).kept_tokens(real_tokens).sum()
    if per_kept * kept / real_tokens.sum() <= BF16_BYTES / ratio:
      return float(budget)
  raise ValueError(f"no pruning budget reaches {ratio}x with {bindings}")


def _run_experiment(e, args, out, data, real_tokens) -> dict:
  gin_file = os.path.join(args.gin_dir, f"{e['gin']}.gin")
  model_dir = os.path.join(out, "models", DEMO_DIRS.get(e["name"], f"compression/{e['name']}"))
  if e["pruned_to"]:  # Its directories name the budget: another budget is another model.
    budget = _budget(e["pruned_to"], gin_file, e["bindings"] + args.gin, real_tokens)
    e = {**e, "bindings": e["bindings"] + [f"TokenPruning.budget = {budget}"], "budget": budget}
    model_dir += f"_budget{budget}"
  common = [*_flags(e["bindings"]), *[f"--gin.{b}" for b in args.gin]]
  train_flags = common + _flags(e["train_bindings"])
  if e["start"] == "lumen":  # As MEMORY-VQ: from LUMEN's parameters, vq_steps more.
    steps = args.vq_steps
    params = os.path.join(out, "models", "lumen", "checkpoints", str(args.train_steps), "params")
    demo.train_from(
        f"{e['name']} from LUMEN", model_dir, gin_file, steps, data, params, train_flags
    )
  else:  # The demo recipe from nothing (LUMEN itself: the demo's, already trained).
    steps = args.train_steps
    demo.train_with_curriculum(
        e["name"], model_dir, gin_file, args.curriculum_steps, steps, data, train_flags
    )
  metrics = demo.evaluate(f"evaluate {e['name']}", model_dir, gin_file, steps, data, common)
  scores = {t: 100 * metrics[f"lumenvq_demo_{t}/{k}"] for t, k in quality.SCORE.items()}
  bindings = e["bindings"] + args.gin
  bytes_per_token, _ = quality.storage(gin_file, bindings, real_tokens)
  row = {
      "model": e["name"],
      "group": e["group"],
      "seed": e["seed"],
      "bytes_per_token": bytes_per_token,
      "full_passage_bytes_per_token": quality.storage(gin_file, bindings)[0],
      "budget": e.get("budget"),
      "compression": BF16_BYTES / bytes_per_token,  # Over the d = 128 reader's bf16 memory.
      "avg_em": sum(scores.values()) / len(scores),
      **scores,
  }
  if e["gin"] == "lumen_vq":
    row.update(_store_figures(e, args, out, model_dir, gin_file, common, real_tokens))
    row["reset_codes"] = _logged_total(model_dir, "quantizer/num_reset_codes")
  return row


def _store_figures(e, args, out, model_dir, gin_file, common, real_tokens) -> dict:
  """The model's store over the whole passage table: bytes on disk per real memory token,
  and per subspace the share of codes used and the perplexity of their use (real tokens).
  Its lengths check the byte accounting: an unpruned store's are the real tokens."""
  store_path = os.path.join(out, "memory", "compression", os.path.basename(model_dir))
  demo.precompute(
      f"precompute {e['name']}",
      model_dir,
      gin_file,
      store_path,
      os.path.join(out, "passages"),
      os.path.join(out, "vocab", "spm.model"),
      common,
  )
  store = memory_store.MemoryStore.open(store_path)
  values, lengths = store.read_range(0, store.num_passages)
  quality.parse_experiment(gin_file, bindings=e["bindings"] + args.gin)
  kept = reader_models.ReaderModel().reader.stored_tokens(real_tokens)
  if not np.array_equal(lengths, kept):
    raise RuntimeError(
        f"{store_path}: its lengths (mean {lengths.mean():.2f}) are not the tokens the reader "
        f"keeps of the demo passages (mean {kept.mean():.2f}): bytes per token would be wrong"
    )
  values = values.reshape(store.num_passages, store.passage_length, store.width)
  codes = values[np.arange(store.passage_length) < lengths[:, None]][:, int(store.positions) :]
  c = store.codebooks.shape[-2]
  usage, perplexity = [], []
  for column in codes.T:  # Stage-major: R blocks of G subspaces.
    p = np.bincount(column, minlength=c) / len(column)
    usage.append(float((p > 0).mean()))
    perplexity.append(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())))
  return {
      "store_bytes_per_token": store.bytes_on_disk() / real_tokens.sum(),
      "real_tokens_per_passage": float(lengths.mean()),
      "codebook_usage": statistics.mean(usage),
      "perplexity": statistics.mean(perplexity),
      "usage_per_subspace": usage,
      "perplexity_per_subspace": perplexity,
  }


def _logged_total(model_dir, tag) -> float:
  """A per-step metric's total over the run, from its TensorBoard windows (each logged
  value is the window's mean per step)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (reads event files)

  points = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          points[event.step] = value.simple_value
  total, last = 0.0, 0
  for step in sorted(points):
    total += points[step] * (step - last)
    last = step
  return total


def _spread(rows) -> float:
  """Max - min of LUMEN-VQ 16x's average over its seeds (None with fewer than two)."""
  seeds = [r["avg_em"] for r in rows if r["model"].startswith("pq_16x")]
  return max(seeds) - min(seeds) if len(seeds) > 1 else None


def _targets(by_name, spread) -> dict:
  lumen = by_name["lumen"]["avg_em"]
  best = lambda ratio: max(
      (
          r
          for r in by_name.values()
          if r["compression"] and r["compression"] >= ratio and r["group"] != "scale_down"
      ),
      key=lambda r: r["avg_em"],
  )
  out = {"seed_spread_pq_16x": spread}
  for ratio, allowed in ((32, 1.0), (64, 3.0)):
    top = best(ratio)
    out[f"best_at_{ratio}x"] = top["model"]
    out[f"{ratio}x_within_{allowed:g}_of_lumen"] = lumen - top["avg_em"] <= allowed
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--only", choices=("frontier", "ablations"), default=None)
  parser.add_argument(
      "--models", default=None, help="comma-separated experiment names (default: all)"
  )
  demo.add_arguments(parser)
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  data = os.path.join(out, "data")
  demo.prepare_data(out, args)
  demo.train_with_curriculum(
      "lumen",
      os.path.join(out, "models", "lumen"),
      os.path.join(args.gin_dir, "lumen.gin"),
      args.curriculum_steps,
      args.train_steps,
      data,
      [f"--gin.{b}" for b in args.gin],
  )
  experiments = (FRONTIER if args.only != "ablations" else []) + (
      ABLATIONS if args.only != "frontier" else []
  )
  if args.models:
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - {e["name"] for e in FRONTIER + ABLATIONS})
    if unknown:
      parser.error(f"--models: unknown experiments {unknown}")
    experiments = [e for e in experiments if e["name"] in wanted]
  real_tokens = quality.real_tokens(out, os.path.join(args.gin_dir, "lumen.gin"))
  rows = [_run_experiment(e, args, out, data, real_tokens) for e in experiments]
  by_name = {r["model"]: r for r in rows}
  columns = [
      "model",
      "group",
      "compression",
      "budget",
      "bytes_per_token",
      "store_bytes_per_token",
      "avg_em",
      *quality.SCORE,
      "perplexity",
      "reset_codes",
  ]
  report.print_table(rows, columns)
  spread = _spread(rows)
  targets = _targets(by_name, spread) if "lumen" in by_name and not args.models else {}
  print("targets:", json.dumps(targets))
  # A part or a subset gets a name of its own: it must not read as the whole benchmark.
  name = "memory_compression"
  if args.only or args.models:
    name += f"_{args.only or 'subset'}"
  report.write_results(name, rows, targets=targets, settings=vars(args))
  if "lumen" in by_name:
    _plot(rows, spread, name)


def _plot(rows, spread, name) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  # One line per method over its seed-0 models; other seeds as loose points of its colour;
  # the bf16 references as labelled points (LUMEN-Light is not a point of any line).
  for group in sorted({r["group"] for r in rows if r["group"] not in ("ablation", "reference")}):
    mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["bytes_per_token"])
    line = ax.errorbar(
        [r["bytes_per_token"] for r in mine if r["seed"] == 0],
        [r["avg_em"] for r in mine if r["seed"] == 0],
        yerr=(spread or 0) / 2,
        marker="o",
        capsize=2,
        label=group,
    )
    others = [r for r in mine if r["seed"] != 0]
    ax.plot(
        [r["bytes_per_token"] for r in others],
        [r["avg_em"] for r in others],
        "x",
        color=line.lines[0].get_color(),
    )
  for r in (r for r in rows if r["group"] == "reference"):
    ax.plot(r["bytes_per_token"], r["avg_em"], "s", color="black")
    ax.annotate(
        r["model"],
        (r["bytes_per_token"], r["avg_em"]),
        fontsize=7,
        xytext=(-60, 4),
        textcoords="offset points",
    )
  lumen = next(r for r in rows if r["model"] == "lumen")["avg_em"]
  ax.axhline(lumen, linestyle="--", color="gray", label="LUMEN (bf16)")
  ax.axhline(lumen - 1, linestyle=":", color="gray", label="LUMEN - 1")
  for ratio in (16, 32, 64):
    ax.axvline(BF16_BYTES / ratio, color="lightgray", linewidth=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("stored bytes per memory token (codes + positions)")
  ax.set_ylabel("demo average EM / accuracy")
  ax.set_title(f"error bars: LUMEN-VQ 16x seed spread ({spread or 0:.1f})", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(report.RESULTS_DIR, f"{name}.png")
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
