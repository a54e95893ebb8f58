r"""`make demo`: the pipeline on the generated demo world, as resumable stages.

    python -m lumenvq.demo [--out demo_out] [--train_steps 300]

Each stage runs the project's own CLI (printed before it runs, so the demo
doubles as the documented command sequence) and is skipped on a rerun when
its output is complete; the CLIs write atomically, so an interrupted stage
(Ctrl-C) is redone, never mistaken for finished.

Stages built so far: the demo world (KILT files), passages, SentencePiece
vocabulary, BM25 retrieval scored with the KILT retrieval metrics, and the
trainer on the tiny network. A LUMEN-VQ recipe that learns to read the demo
tasks, the quantized memory store and evaluation from it are not built yet,
so the training stage trains the tiny T5 on the generated copy task
(`lumenvq_debug_copy`) and says so.
"""
import argparse
import json
import os
import subprocess
import sys
import time

TASKS = ("nq", "hotpotqa", "fever", "structured_zeroshot")


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
    raise SystemExit(f"demo stage '{title}' failed (exit {result.returncode}); its error is "
                     "above. Finished stages are kept: rerun to continue from here.")
  print(f"   ({time.time() - start:.1f} s)", flush=True)
  return result.stdout


def _retrieval_table(out: str, data: str, retrieval: str) -> list:
  rows = []
  for task in TASKS:
    guess = os.path.join(retrieval, f"{task}-dev-bm25-kilt.jsonl")
    gold = os.path.join(data, f"{task}-dev-kilt.jsonl")
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "lumenvq.kilt_eval", guess, gold, "--retrieval",
         "--ks", "1,5,20", "--rank_keys", "wikipedia_id"],
        check=True, text=True, stdout=subprocess.PIPE).stdout)
    rows.append({"task": task, **{k: report[k] for k in
                                  ("Rprec", "recall@5", "recall@20", "success_rate@5")}})
  with open(os.path.join(out, "retrieval_metrics.json"), "w") as f:
    json.dump(rows, f, indent=2)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m lumenvq.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--num_entities", type=int, default=2500)
  parser.add_argument("--train_size", type=int, default=5000)
  parser.add_argument("--dev_size", type=int, default=500)
  parser.add_argument("--words", type=int, default=28, help="words per passage")
  parser.add_argument("--vocab_size", type=int, default=2000)
  parser.add_argument("--train_steps", type=int, default=300)
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  data, passages = os.path.join(out, "data"), os.path.join(out, "passages")
  vocab, retrieval = os.path.join(out, "vocab"), os.path.join(out, "retrieval")
  model_dir = os.path.join(out, "copy_model")
  os.makedirs(out, exist_ok=True)
  knowledge_source = os.path.join(data, "kilt_knowledgesource.json")

  # The demo and retrieval CLIs check their own completion records and skip
  # finished work themselves; the others are skipped here by their final file.
  _run("demo world (KILT-format knowledge source and tasks)",
       ["lumenvq.data.demo", "--out", data, f"--num_entities={args.num_entities}",
        f"--train_size={args.train_size}", f"--dev_size={args.dev_size}"], False)
  _run("passages", ["lumenvq.data.passages", "--knowledge_source", knowledge_source,
                    "--out", passages, f"--words={args.words}", "--no_progress"],
       os.path.exists(os.path.join(passages, "manifest.json")))
  _run("SentencePiece vocabulary",
       ["lumenvq.data.train_vocab", "--knowledge_source", knowledge_source,
        "--out", os.path.join(vocab, "spm"), f"--vocab_size={args.vocab_size}"],
       os.path.exists(os.path.join(vocab, "spm.model")))
  _run("BM25 retrieval", ["lumenvq.data.retrieve", "--passages", passages, "--data_dir", data,
                          "--tasks", ",".join(TASKS), "--splits", "train,dev", "--out",
                          retrieval, "--k", "20", "--no_progress"], False)
  rows = _retrieval_table(out, data, retrieval)

  print("== training: LUMEN-VQ on the demo tasks, its memory store and evaluation from it are "
        "not built yet; training the tiny T5 on the generated copy task "
        "(lumenvq_debug_copy) instead", flush=True)
  _run("train tiny T5", ["lumenvq.train", "--gin_file=gin_configs/debug/tiny_train.gin",
                         f"--gin.MODEL_DIR='{model_dir}'",
                         f"--gin.TRAIN_STEPS={args.train_steps}",
                         "--gin.get_source.backend='numpy'"], False)
  _run("evaluate tiny T5", ["lumenvq.eval", "--gin_file=gin_configs/runs/eval.gin",
                             "--gin_file=gin_configs/debug/tiny_task.gin",
                             f"--gin.MODEL_DIR='{model_dir}'",
                             "--gin.get_source.backend='numpy'"], False)

  print("\nBM25 retrieval on the demo dev sets (KILT retrieval metrics, rank key wikipedia_id)")
  print(f"{'task':<22}{'R-prec':>8}{'recall@5':>10}{'recall@20':>11}{'success@5':>11}")
  for r in rows:
    print(f"{r['task']:<22}{r['Rprec']:>8.3f}{r['recall@5']:>10.3f}{r['recall@20']:>11.3f}"
          f"{r['success_rate@5']:>11.3f}")
  with open(os.path.join(model_dir, "eval", f"metrics_{args.train_steps}.json")) as f:
    copy = json.load(f)["metrics"]
  print(f"\ntiny T5 on the copy task after {args.train_steps} steps ({copy['examples']} "
        f"validation examples): token accuracy {copy['accuracy']:.3f}, exact copies "
        f"{copy['sequence_accuracy']:.1f}%")
  print(f"\nEverything is under {out}.")


if __name__ == "__main__":
  main()
