r"""`make demo`: the whole pipeline on the generated demo world, as resumable stages.

    python -m lumenvq.demo [--out demo_out] [--train_steps 1500] [--vq_steps 200]

Stages: the demo world (KILT files) -> passages -> SentencePiece vocabulary -> BM25
retrieval (scored with the KILT retrieval metrics) -> LUMEN trained with a curriculum
(single-hop questions on their top passage, then every task on K passages) -> LUMEN-VQ started from it (MEMORY-VQ's
recipe) -> the quantized memory store (and the uncompressed LUMEN store, for the storage
table) -> eval of LUMEN-VQ reading the store -> KILT metrics of its predictions.

Each stage runs the project's own CLI (printed before it runs, so the demo doubles as the
documented command sequence) and is skipped on a rerun when its output is complete. The
CLIs write atomically (checkpoints, store shards with completion markers, metrics and
predictions written whole: a rename, or one upload on gs://), so an interrupted stage
(Ctrl-C) is redone or resumed, never mistaken for finished. `--out` may be gs://.
"""

import argparse
import json
import subprocess
import sys
import time

from lumenvq import paths

TASKS = ("nq", "hotpotqa", "fever", "structured_zeroshot")
DOWNSTREAM = ("em", "f1", "accuracy", "rougel")


def _run(title: str, args, done: bool, *, capture: bool = False):
  """Runs `python -m ARGS` unless `done`; returns its stdout when `capture`."""
  command = [sys.executable, "-m", *args]
  if done:
    print(f"== {title}: finished earlier, reusing it", flush=True)
    return None
  print(f"== {title}\n$ {' '.join(command)}", flush=True)
  start = time.time()
  result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
  if result.returncode:
    raise SystemExit(
        f"demo stage '{title}' failed (exit {result.returncode}); its error is "
        "above. Finished stages are kept: rerun to continue from here."
    )
  print(f"   ({time.time() - start:.1f} s)", flush=True)
  return result.stdout


def _kilt_eval(guess: str, gold: str, *flags) -> dict:
  return json.loads(
      subprocess.run(
          [sys.executable, "-m", "lumenvq.kilt_eval", guess, gold, *flags],
          check=True,
          text=True,
          stdout=subprocess.PIPE,
      ).stdout
  )


def _retrieval_table(out: str, data: str, retrieval: str) -> list:
  rows = []
  for task in TASKS:
    report = _kilt_eval(
        paths.join(retrieval, f"{task}-dev-bm25-kilt.jsonl"),
        paths.join(data, f"{task}-dev-kilt.jsonl"),
        "--retrieval",
        "--ks",
        "1,5,20",
        "--rank_keys",
        "wikipedia_id",
    )
    rows.append(
        {
            "task": task,
            **{k: report[k] for k in ("Rprec", "recall@5", "recall@20", "success_rate@5")},
        }
    )
  paths.write_text(paths.join(out, "retrieval_metrics.json"), json.dumps(rows, indent=2))
  return rows


def _checkpoint_done(model_dir: str, step: int) -> bool:
  """A checkpoint at `step` or later (older ones are pruned as training goes on)."""
  directory = paths.path(model_dir, "checkpoints")
  steps = (
      [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
  )
  return max(steps, default=-1) >= step


def _train(title, model_dir, gin_file, steps, data, extra=()):
  _run(
      title,
      [
          "lumenvq.train",
          "--gin_file=gin_configs/runs/train.gin",
          f"--gin_file={gin_file}",
          "--gin_file=gin_configs/demo/train.gin",
          f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={steps}",
          f"--gin.demo_data.data_dir='{data}'",
          *extra,
      ],
      _checkpoint_done(model_dir, steps),
  )


def precompute(title, model_dir, gin_file, store, passages, vocab, extra=()):
  """`lumenvq.precompute_memory` of MODEL_DIR's latest checkpoint into `store`; skipped when
  the store is COMPLETE."""
  _run(
      title,
      [
          "lumenvq.precompute_memory",
          f"--gin_file={gin_file}",
          "--gin_file=gin_configs/runs/precompute.gin",
          f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.STORE_PATH='{store}'",
          f"--gin.PASSAGES_DIR='{passages}'",
          f"--gin.VOCABULARY_PATH='{vocab}'",
          "--gin.SHARD_PASSAGES=1024",
          *extra,
      ],
      paths.path(store, "COMPLETE").exists(),
  )


def _storage_rows(stores: dict) -> list:
  """Bytes per memory token of each store on disk (metadata and codebooks included), and
  its compression over uncompressed bf16 memory (d x 2 bytes a token: the first row)."""
  from lumenvq.memory import memory_store  # pylint: disable=g-import-not-at-top  (after the stages)

  opened = {name: memory_store.MemoryStore.open(path) for name, path in stores.items()}
  d = next(s.width for s in opened.values() if s.kind == "vectors")
  rows = [
      {
          "memory": "bf16, uncompressed",
          "kind": "d x 2 bytes",
          "passages": None,
          "bytes_on_disk": None,
          "bytes_per_token": 2.0 * d,
      }
  ]
  for name, store in opened.items():
    size = store.bytes_on_disk()
    rows.append(
        {
            "memory": name,
            "kind": store.kind,
            "passages": store.num_passages,
            "bytes_on_disk": size,
            "bytes_per_token": size / (store.num_passages * store.passage_length),
        }
    )
  for row in rows:
    row["compression"] = rows[0]["bytes_per_token"] / row["bytes_per_token"]
  return rows


def prepare_data(out: str, args) -> list:
  """World, passages, vocabulary and BM25 retrieval under `out`; the retrieval table rows."""
  data, passages = paths.join(out, "data"), paths.join(out, "passages")
  vocab, retrieval = paths.join(out, "vocab"), paths.join(out, "retrieval")
  knowledge_source = paths.join(data, "kilt_knowledgesource.json")
  # The demo and retrieval CLIs check their own completion records and skip
  # finished work themselves; the others are skipped here by their final file.
  _run(
      "demo world (KILT-format knowledge source and tasks)",
      [
          "lumenvq.data.demo",
          "--out",
          data,
          f"--num_entities={args.num_entities}",
          f"--train_size={args.train_size}",
          f"--dev_size={args.dev_size}",
      ],
      False,
  )
  _run(
      "passages",
      [
          "lumenvq.data.passages",
          "--knowledge_source",
          knowledge_source,
          "--out",
          passages,
          f"--words={args.words}",
          "--no_progress",
      ],
      paths.path(passages, "manifest.json").exists(),
  )
  train_files = ",".join(paths.join(data, f"{t}-train-kilt.jsonl") for t in TASKS)
  _run(
      "SentencePiece vocabulary (BPE on the knowledge source and training questions)",
      [
          "lumenvq.data.train_vocab",
          "--knowledge_source",
          knowledge_source,
          "--out",
          paths.join(vocab, "spm"),
          f"--vocab_size={args.vocab_size}",
          "--model_type=bpe",
          "--character_coverage=1.0",
          f"--kilt_files={train_files}",
      ],
      paths.path(vocab, "spm.model").exists(),
  )
  _run(
      "BM25 retrieval",
      [
          "lumenvq.data.retrieve",
          "--passages",
          passages,
          "--data_dir",
          data,
          "--tasks",
          ",".join(TASKS),
          "--splits",
          "train,dev",
          "--out",
          retrieval,
          "--k",
          "20",
          "--no_progress",
      ],
      False,
  )
  return _retrieval_table(out, data, retrieval)


def train_with_curriculum(name, model_dir, gin_file, curriculum_steps, train_steps, data, extra=()):
  """The demo recipe's two train calls on one MODEL_DIR: single-hop questions on their top
  passage only, then every task on K passages."""
  _train(
      f"train {name}, curriculum: single-hop questions, top passage only",
      model_dir,
      gin_file,
      curriculum_steps,
      data,
      [
          "--gin.ReaderConfig.num_passages=1",
          "--gin.MIXTURE_OR_TASK_NAME='lumenvq_demo_single_hop'",
          *extra,
      ],
  )
  _train(f"train {name} on K passages", model_dir, gin_file, train_steps, data, extra)


def train_from(title, model_dir, gin_file, steps, data, initial_params, extra=()):
  """A train call initialised from another run's parameters (LUMEN-VQ from LUMEN)."""
  _train(
      f"train {title}",
      model_dir,
      gin_file,
      steps,
      data,
      [f"--gin.INITIAL_CHECKPOINT_PATH='{initial_params}'", *extra],
  )


def evaluate(title, model_dir, gin_file, step, data, extra=(), output_dir=None) -> dict:
  """`lumenvq.eval` of MODEL_DIR's checkpoint `step` on the demo dev sets; its metrics.
  Also writes each task's KILT predictions into `output_dir` (default MODEL_DIR/eval)."""
  output_dir = output_dir or paths.join(model_dir, "eval")
  metrics = paths.join(output_dir, f"metrics_{step}.json")
  _run(
      title,
      [
          "lumenvq.eval",
          "--gin_file=gin_configs/runs/eval.gin",
          f"--gin_file={gin_file}",
          f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.EVAL_OUTPUT_DIR='{output_dir}'",
          f"--gin.CHECKPOINT_STEP={step}",
          f"--gin.demo_data.data_dir='{data}'",
          *extra,
      ],
      paths.path(metrics).exists(),
  )
  return json.loads(paths.path(metrics).read_text())["metrics"]


def add_arguments(parser) -> None:
  """The demo world's and the recipe's flags (shared with benchmarks/quality.py)."""
  parser.add_argument("--num_entities", type=int, default=2500)
  parser.add_argument("--train_size", type=int, default=5000)
  parser.add_argument("--dev_size", type=int, default=500)
  parser.add_argument("--words", type=int, default=28, help="words per passage")
  parser.add_argument("--vocab_size", type=int, default=6000)
  parser.add_argument(
      "--curriculum_steps",
      type=int,
      default=500,
      help="LUMEN steps on single-hop questions and their top passage, before all tasks on K",
  )
  parser.add_argument("--train_steps", type=int, default=1500, help="LUMEN steps in all")
  parser.add_argument(
      "--vq_steps", type=int, default=200, help="LUMEN-VQ steps from the LUMEN checkpoint"
  )
  parser.add_argument(
      "--gin_dir",
      default="gin_configs/demo",
      help="the reader experiment files (lumen.gin, lumen_vq.gin)",
  )
  parser.add_argument(
      "--gin",
      action="append",
      default=[],
      help="extra gin binding for every model stage, e.g. T5Config.emb_dim=64",
  )


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.demo",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--out", default="demo_out", help="output directory (local or gs://)")
  add_arguments(parser)
  args = parser.parse_args(argv)
  if not 0 < args.curriculum_steps < args.train_steps:
    parser.error(
        f"--curriculum_steps={args.curriculum_steps} must be in (0, --train_steps="
        f"{args.train_steps})"
    )
  out = paths.resolve(args.out)
  data, passages = paths.join(out, "data"), paths.join(out, "passages")
  spm_model = paths.join(out, "vocab", "spm.model")
  lumen_dir = paths.join(out, "models", "lumen")
  vq_dir = paths.join(out, "models", "lumen_vq")
  stores = {
      "lumen (bf16, zstd)": paths.join(out, "memory", "lumen"),
      "lumen_vq (codes)": paths.join(out, "memory", "lumen_vq"),
  }
  lumen_gin, vq_gin = (paths.join(args.gin_dir, f"{a}.gin") for a in ("lumen", "lumen_vq"))
  extra = [f"--gin.{binding}" for binding in args.gin]
  paths.makedirs(out)
  retrieval_rows = prepare_data(out, args)
  train_with_curriculum(
      "LUMEN", lumen_dir, lumen_gin, args.curriculum_steps, args.train_steps, data, extra
  )
  train_from(
      "LUMEN-VQ from the LUMEN checkpoint",
      vq_dir,
      vq_gin,
      args.vq_steps,
      data,
      paths.join(lumen_dir, "checkpoints", str(args.train_steps), "params"),
      extra,
  )
  precompute(
      "precompute the LUMEN-VQ memory store (codes)",
      vq_dir,
      vq_gin,
      stores["lumen_vq (codes)"],
      passages,
      spm_model,
      extra,
  )
  precompute(
      "precompute the LUMEN memory store (bf16 vectors, for comparison)",
      lumen_dir,
      lumen_gin,
      stores["lumen (bf16, zstd)"],
      passages,
      spm_model,
      extra,
  )
  eval_dir = paths.join(vq_dir, "eval_from_store")
  evaluate(
      "evaluate LUMEN-VQ reading the store (device-resident table)",
      vq_dir,
      vq_gin,
      args.vq_steps,
      data,
      [
          "--gin_file=gin_configs/runs/stored_memory.gin",
          f"--gin.MEMORY_STORE='{stores['lumen_vq (codes)']}'",
          "--gin.MEMORY_READER='device'",
          "--gin.BATCH_SIZE=100",
          *extra,
      ],
      output_dir=eval_dir,
  )

  downstream = []
  for task in TASKS:
    guess = paths.join(eval_dir, f"lumenvq_demo_{task}-validation-{args.vq_steps}.jsonl")
    report = _kilt_eval(guess, paths.join(data, f"{task}-dev-kilt.jsonl"))["downstream"]
    downstream.append({"task": task, **{k: report[k] for k in DOWNSTREAM}})
  storage = _storage_rows(stores)
  paths.write_text(
      paths.join(out, "results.json"),
      json.dumps(
          {"retrieval": retrieval_rows, "downstream": downstream, "storage": storage}, indent=2
      ),
  )

  print("\nBM25 retrieval on the demo dev sets (KILT retrieval metrics, rank key wikipedia_id)")
  print(f"{'task':<22}{'R-prec':>8}{'recall@5':>10}{'recall@20':>11}{'success@5':>11}")
  for r in retrieval_rows:
    print(
        f"{r['task']:<22}{r['Rprec']:>8.3f}{r['recall@5']:>10.3f}{r['recall@20']:>11.3f}"
        f"{r['success_rate@5']:>11.3f}"
    )
  print(
      f"\nLUMEN-VQ reading its quantized memory store, demo dev sets (KILT downstream "
      f"metrics, %)"
  )
  print(f"{'task':<22}{'EM':>8}{'F1':>8}{'accuracy':>10}{'ROUGE-L':>9}")
  for r in downstream:
    print(
        f"{r['task']:<22}{100 * r['em']:>8.1f}{100 * r['f1']:>8.1f}"
        f"{100 * r['accuracy']:>10.1f}{100 * r['rougel']:>9.1f}"
    )
  print("\nMemory stores on disk (metadata included)")
  print(f"{'memory':<20}{'passages':>9}{'bytes':>12}{'bytes/token':>13}{'compression':>13}")
  for r in storage:
    passages = "" if r["passages"] is None else r["passages"]
    size = "" if r["bytes_on_disk"] is None else f"{r['bytes_on_disk']:,}"
    print(
        f"{r['memory']:<20}{passages:>9}{size:>12}{r['bytes_per_token']:>13.1f}"
        f"{r['compression']:>12.1f}x"
    )
  print(f"\nEverything is under {out} (results.json holds these tables).")


if __name__ == "__main__":
  main()
