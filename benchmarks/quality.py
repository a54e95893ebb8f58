"""Quality against compression on the demo tasks: FiD, LUMEN, LUMEN-VQ at 16x and 32x and
LUMEN-Light at 4x, trained with the same recipe, size, steps and seed (gin_configs/demo).

    python benchmarks/quality.py [--out demo_out] [--train_steps 1500] [--vq_steps 200]

Runs the demo's data stages when missing (`lumenvq.demo.prepare_data`), then for each
model the project's train and eval CLIs: FiD, LUMEN and LUMEN-Light with the demo's
curriculum (top passage only, then K); LUMEN-VQ from the trained LUMEN checkpoint, as
MEMORY-VQ does (it trains `vq_steps` more). Finished stages are reused, so models the
demo trained (demo_out/models/lumen, lumen_vq) are not trained twice. Reports per-task
scores (KILT's: EM; accuracy for FEVER and zsRE), their average, bytes per real memory token
of the demo passages (bf16 for float memory, the codes for LUMEN-VQ), compression over bf16, train step time (median of 20
jitted steps on one batch, every model timed back to back at the end, so that they share
the machine's conditions) and decode time per eval example (after the first batch). Writes benchmarks/results/quality.json and quality.png.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.chdir(REPO)  # The CLIs and gin includes name files relative to the repository root.

import gin  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every module that registers gin configurables is imported before any gin file is parsed
# (parsing locks the config).
from lumenvq.model import reader_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq.training import gin_cli, input_pipeline, optimizers, partitioning  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq import demo  # pylint: disable=g-import-not-at-top,wrong-import-position

# (model, gin file under --gin_dir, start from LUMEN's checkpoint)
MODELS = (
    ("fid", "fid", False),
    ("lumen", "lumen", False),
    ("lumen_vq_16x", "lumen_vq", True),
    ("lumen_vq_32x", "lumen_vq_32x", True),
    ("lumen_light_4x", "lumen_light", False),
)
SCORE = {"nq": "em", "hotpotqa": "em", "fever": "accuracy", "structured_zeroshot": "accuracy"}


def parse_experiment(gin_file: str, data: str = None, bindings=()) -> None:
  """gin cleared, then the experiment file and its bindings parsed (as the CLIs do)."""
  gin.clear_config()
  data_binding = [f"demo_data.data_dir = '{data}'"] if data else []
  gin_cli.parse_gin([gin_file], data_binding + list(bindings))


def _step_seconds(gin_file: str, data: str, steps: int = 20) -> float:
  """Median seconds of the jitted train step on the experiment's own batches (K passages),
  every model measured here back to back so they share the machine's conditions."""
  import time  # pylint: disable=g-import-not-at-top

  parse_experiment(gin_file, data)
  model = reader_models.ReaderModel()
  lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
  batch_size = gin.query_parameter("%BATCH_SIZE")
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(
      model,
      optimizers.make_optimizer(optimizers.adafactor, optimizers.constant_schedule(0.01)),
      mesh,
      partitioning.standard_logical_axis_rules(),
  )
  source = input_pipeline.get_source(gin.query_parameter("%MIXTURE_OR_TASK_NAME"), lengths)
  batches = input_pipeline.train_batches(
      source, model.feature_converter(lengths), input_pipeline.data_layout(mesh, batch_size), 0
  )
  batch = input_pipeline.to_global(next(batches), mesh, batch_size)
  state = trainer.init_state()
  state, _ = trainer.train_step(state, batch)  # Compiles.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def real_tokens(out: str, gin_file: str) -> np.ndarray:
  """Real tokens of every demo passage as `gin_file`'s reader sees it (its ids and EOS, cut to
  the passage length): what bytes per memory token are counted over, since padding is not
  memory (counted per passage slot, a reader that drops padding would read as compressing)."""
  from lumenvq.data import vocab  # pylint: disable=g-import-not-at-top
  from lumenvq.data.passage_table import PassageTable  # pylint: disable=g-import-not-at-top

  parse_experiment(gin_file)
  lp = reader_models.ReaderModel().reader.passage_length
  spm = vocab.get_vocabulary(os.path.join(out, "vocab", "spm.model"))
  table = PassageTable(os.path.join(out, "passages"))
  return np.array([min(len(spm.encode(text)) + 1, lp) for text in table.iter_texts()])


def storage(gin_file: str, bindings=(), real_tokens=None) -> tuple:
  """(bytes per memory token, compression over bf16) from the experiment's ReaderConfig, per
  real token of passages with `real_tokens` real tokens each (default: full passages)."""
  parse_experiment(gin_file, bindings=bindings)
  model = reader_models.ReaderModel()
  cfg, reader = model.config, model.reader
  if reader.architecture == "fid":
    return None, None  # FiD keeps no memory: every passage is re-encoded per question.
  # Per real token (LUMEN-Light keeps the first M of them); float memory is stored as bf16.
  per_token = reader.memory_bytes_per_token(dataclasses.replace(cfg, dtype="bfloat16"), real_tokens)
  return per_token, 2 * cfg.emb_dim / per_token


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="demo_out")
  demo.add_arguments(parser)
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  data = os.path.join(out, "data")
  extra = [f"--gin.{binding}" for binding in args.gin]
  demo.prepare_data(out, args)
  lumen_dir = os.path.join(out, "models", "lumen")
  tokens = real_tokens(out, os.path.join(args.gin_dir, "lumen.gin"))
  rows = []
  for name, gin_name, from_lumen in MODELS:
    gin_file = os.path.join(args.gin_dir, f"{gin_name}.gin")
    model_dir = os.path.join(out, "models", name if name != "lumen_vq_16x" else "lumen_vq")
    if from_lumen:
      steps = args.vq_steps
      demo.train_from(
          f"{name} from the LUMEN checkpoint",
          model_dir,
          gin_file,
          steps,
          data,
          os.path.join(lumen_dir, "checkpoints", str(args.train_steps), "params"),
          extra,
      )
    else:
      steps = args.train_steps
      demo.train_with_curriculum(
          name, model_dir, gin_file, args.curriculum_steps, steps, data, extra
      )
    metrics = demo.evaluate(f"evaluate {name}", model_dir, gin_file, steps, data, extra)
    scores = {task: 100 * metrics[f"lumenvq_demo_{task}/{key}"] for task, key in SCORE.items()}
    bytes_per_token, compression = storage(gin_file, real_tokens=tokens)
    seconds = [metrics[f"lumenvq_demo_{task}/seconds_per_example"] for task in SCORE]
    rows.append(
        {
            "model": name,
            "compression": compression,
            "bytes_per_token": bytes_per_token,
            "avg_em": sum(scores.values()) / len(scores),
            **scores,
            "train_step_s": None,
            "eval_s_per_example": sum(seconds) / len(seconds),
        }
    )
  for row, (_, gin_name, _) in zip(rows, MODELS):
    row["train_step_s"] = _step_seconds(os.path.join(args.gin_dir, f"{gin_name}.gin"), data)
  report.print_table(
      rows,
      [
          "model",
          "compression",
          "bytes_per_token",
          "avg_em",
          *SCORE,
          "train_step_s",
          "eval_s_per_example",
      ],
  )
  by_name = {r["model"]: r for r in rows}
  targets = {
      "lumen_reads (avg >= 30)": by_name["lumen"]["avg_em"] >= 30,
      "vq16_within_1_of_lumen": by_name["lumen"]["avg_em"] - by_name["lumen_vq_16x"]["avg_em"]
      <= 1.0,
      "light4_below_vq16": by_name["lumen_light_4x"]["avg_em"] < by_name["lumen_vq_16x"]["avg_em"],
      "lumen_step_faster_than_fid": by_name["lumen"]["train_step_s"]
      < by_name["fid"]["train_step_s"],
  }
  print("targets:", json.dumps(targets))
  report.write_results("quality", rows, targets=targets, settings=vars(args))
  _plot([r for r in rows if r["bytes_per_token"]], by_name["fid"]["avg_em"])


def _plot(rows, fid_em: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["bytes_per_token"], r["avg_em"])
    ax.annotate(r["model"], (r["bytes_per_token"], r["avg_em"]), fontsize=8)
  ax.axhline(fid_em, linestyle="--", color="gray", label="FiD (no stored memory)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("stored bytes per memory token")
  ax.set_ylabel("demo average EM / accuracy")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(report.RESULTS_DIR, "quality.png")
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
