"""lumenvq's EMA product quantizer against faiss.ProductQuantizer: quality and speed.

For each dataset and (G, bits) setting, both quantizers are trained on the same training
vectors and measured on the same held-out vectors:

* relative reconstruction MSE  sum ||x - decode(encode(x))||^2 / sum ||x||^2,
* encode and decode throughput (vectors/s; lumenvq jit-compiled, compile excluded,
  block_until_ready; the best of --repeats calls in a row, `report.best_times`; decode as
  `decode_times` says). FAISS decodes on every core (OpenMP); lumenvq's decode is measured
  as the reader runs it, data-parallel over the host's devices (on CPU one device per core,
  --xla_force_host_platform_device_count), and on one device alone.

lumenvq trains as it would inside a model, minus the model: k-means++ seeding from the first
batch (+ optional Lloyd iterations on it), then EMA steps over shuffled batches.

Datasets: synthetic correlated Gaussians (default); the memory vectors of a trained LUMEN
memory encoder read from a memory store (--store; default the one `make demo` writes,
demo_out/memory/lumen, when it exists: real tokens only); and any [N, d] float .npy given
with --vectors. Each is split train/eval.

  python benchmarks/pq_vs_faiss.py                  # synthetic d=128/G=16 and d=512/G=64
  python benchmarks/pq_vs_faiss.py --vectors mem.npy --subspaces 16 --no-synthetic

Writes benchmarks/results/pq_vs_faiss.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={os.cpu_count()}"
  ).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position  (after XLA_FLAGS)
import faiss
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import report
from lumenvq.quant import pq_codec
from lumenvq.quant.quantizer import ProductQuantizer, QUANTIZER_COLLECTION, export_codebooks

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def correlated_gaussian(n: int, d: int, seed: int) -> np.ndarray:
  """x = z diag(sqrt(lambda)) Q: a random rotation of a 1/i-decaying spectrum, so dims are
  correlated across subspaces and variance is uneven, as in learned representations."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  scale = np.sqrt(1.0 / np.arange(1, d + 1))
  return ((rng.standard_normal((n, d)) * scale) @ q).astype(np.float32)


def decode_times(decode, split, books, codes, cb, pq, fcodes, args) -> dict:
  """Best decode times of ours (data-parallel and on one device) and FAISS's: the best of
  --decode-rounds rounds of --decode-repeats decodes of fresh copies of the codes."""

  def fresh():
    mine, theirs = jax.device_put(split, split.sharding), np.array(fcodes)
    one = jax.device_put(np.asarray(codes))
    return {
        "ours_dec": lambda: decode(mine, books),
        "ours_dec_1": lambda: decode(one, cb),
        "faiss_dec": lambda: pq.decode(theirs),
    }

  return report.best_of_rounds(fresh, args.decode_rounds, args.decode_repeats)


def rel_mse(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(((x - y) ** 2).sum() / (x**2).sum())


def train_lumenvq(train, g, c, args):
  model = ProductQuantizer(
      num_subspaces=g,
      codebook_size=c,
      ema_decay=args.ema_decay,
      init_lloyd_iters=args.init_lloyd_iters,
      init_rounds=args.init_rounds,
  )
  b = min(args.batch_size, train.shape[0])

  @jax.jit
  def step(variables, x, key):
    (_, metrics), new = model.apply(
        variables, x, train=True, mutable=[QUANTIZER_COLLECTION], rngs={"quantizer": key}
    )
    return new, metrics

  variables = model.init({}, train[:b])
  rng = np.random.default_rng(args.seed)
  key = jax.random.key(args.seed)
  t0, steps = time.perf_counter(), 0
  for epoch in range(args.epochs):
    order = rng.permutation(train.shape[0])
    for start in range(0, train.shape[0] - b + 1, b):  # full batches only: one compile
      variables, metrics = step(
          variables, train[order[start : start + b]], jax.random.fold_in(key, steps)
      )
      steps += 1
  jax.block_until_ready(variables)
  info = {
      "train_s": time.perf_counter() - t0,
      "steps": steps,
      "last_batch_rel_mse": float(metrics["relative_reconstruction_error"]),
      "last_batch_usage": float(metrics["codebook_usage"]),
  }
  return np.asarray(export_codebooks(variables)), info


def run_setting(name, train, evals, g, bits, args):
  d, c = train.shape[1], 2**bits
  print(f"[{name}] d={d} G={g} C={c}: training lumenvq ...", flush=True)
  codebooks, info = train_lumenvq(train, g, c, args)
  encode = jax.jit(lambda x, cb: pq_codec.encode(x, cb, chunk_size=args.chunk_size))
  decode = jax.jit(pq_codec.decode)
  xe, cb = jnp.asarray(evals), jnp.asarray(codebooks)
  codes = encode(xe, cb)
  ours = {"rel_mse": rel_mse(evals, decode(codes, cb)), **info}

  print(f"[{name}] training faiss ...", flush=True)
  pq = faiss.ProductQuantizer(d, g, bits)
  t0 = time.perf_counter()
  pq.train(train)
  fcodes = pq.compute_codes(evals)
  theirs = {"rel_mse": rel_mse(evals, pq.decode(fcodes)), "train_s": time.perf_counter() - t0}
  mesh = Mesh(np.array(jax.local_devices()), ("data",))
  n = evals.shape[0] - evals.shape[0] % mesh.size  # Rows that split evenly over the mesh.
  split, books = (
      jax.device_put(codes[:n], NamedSharding(mesh, P("data"))),
      jax.device_put(cb, NamedSharding(mesh, P())),
  )
  t = report.best_times(
      {"ours_enc": lambda: encode(xe[:n], cb), "faiss_enc": lambda: pq.compute_codes(evals[:n])},
      args.repeats,
  )
  t.update(decode_times(decode, split, books, codes[:n], cb, pq, fcodes[:n], args))
  ours.update(
      encode_s=t["ours_enc"],
      decode_s=t["ours_dec"],
      decode_1_device_s=t["ours_dec_1"],
      decode_devices=mesh.size,
  )
  theirs.update(encode_s=t["faiss_enc"], decode_s=t["faiss_dec"])
  row = {"dataset": name, "d": d, "G": g, "bits": bits, "n_train": train.shape[0], "n_eval": n}
  for who, res in (("lumenvq", ours), ("faiss", theirs)):
    res["encode_vec_per_s"] = n / res["encode_s"]
    res["decode_vec_per_s"] = n / res["decode_s"]
    row[who] = res
  ours["decode_1_device_vec_per_s"] = n / ours["decode_1_device_s"]
  row["decode_1_device_speed_ratio"] = t["faiss_dec"] / t["ours_dec_1"]
  row["mse_ratio"] = ours["rel_mse"] / theirs["rel_mse"]
  row["decode_speed_ratio"] = ours["decode_vec_per_s"] / theirs["decode_vec_per_s"]
  row["encode_speed_ratio"] = ours["encode_vec_per_s"] / theirs["encode_vec_per_s"]
  return row


def print_table(rows):
  head = (
      f"{'dataset':<18}{'d':>5}{'G':>4}{'bits':>5} | {'rel MSE ours':>12}{'faiss':>9}"
      f"{'ratio':>7} | {'enc/s ours':>11}{'faiss':>10} | {'dec/s ours':>11}{'1 device':>10}"
      f"{'faiss':>11}{'ratio':>7}{'1 dev':>7}"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    o, f = r["lumenvq"], r["faiss"]
    print(
        f"{r['dataset']:<18}{r['d']:>5}{r['G']:>4}{r['bits']:>5} | {o['rel_mse']:>12.4f}"
        f"{f['rel_mse']:>9.4f}{r['mse_ratio']:>7.3f} | {o['encode_vec_per_s']:>11.3g}"
        f"{f['encode_vec_per_s']:>10.3g} | {o['decode_vec_per_s']:>11.3g}"
        f"{o['decode_1_device_vec_per_s']:>10.3g}{f['decode_vec_per_s']:>11.3g}"
        f"{r['decode_speed_ratio']:>7.2f}{r['decode_1_device_speed_ratio']:>7.2f}"
    )
  print(
      f"dec/s ours: data-parallel over {rows[0]['lumenvq']['decode_devices']} devices (ratio: "
      "ours / faiss); 1 device: one device alone (1 dev: its ratio)"
  )


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = [f"{r['dataset'].replace('-', chr(10), 1)}\nd={r['d']} G={r['G']}" for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  panels = (
      ("rel_mse", "relative reconstruction MSE (lower is better)", False),
      ("encode_vec_per_s", "encode vectors/s (log)", True),
      (
          "decode_vec_per_s",
          f"decode vectors/s (log; lumenvq on " f"{rows[0]['lumenvq']['decode_devices']} devices)",
          True,
      ),
  )
  for ax, (key, title, log) in zip(axes, panels):
    for i, who in enumerate(("lumenvq", "faiss")):
      ax.bar(x + (i - 0.5) * 0.38, [r[who][key] for r in rows], 0.38, label=who)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    if log:
      ax.set_yscale("log")
  axes[0].set_ylim(0, 1.3 * max(r[w]["rel_mse"] for r in rows for w in ("lumenvq", "faiss")))
  axes[0].legend(loc="upper right", ncol=2)
  fig.suptitle(
      f"lumenvq PQ vs faiss.ProductQuantizer ({jax.devices()[0].platform}, "
      f"{os.cpu_count()} cpus; throughput = best of repeats)",
      fontsize=10,
  )
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


def store_vectors(path: str) -> np.ndarray:
  """[tokens, d] float32: every real token's memory vector in a LUMEN memory store."""
  from lumenvq.memory import memory_store  # pylint: disable=g-import-not-at-top

  store = memory_store.MemoryStore.open(path)
  if store.kind != "vectors":
    raise ValueError(f"--store {path} holds {store.kind}; a LUMEN (vectors) store is needed")
  values, lengths = store.read_range(0, store.num_passages)
  mask = memory_store.MemoryStore.mask(lengths, store.passage_length)
  return np.asarray(values[mask], np.float32)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vectors", help="[N, d] float .npy to benchmark as an extra dataset")
  p.add_argument("--subspaces", type=int, nargs="+", default=[16], help="G settings for --vectors")
  p.add_argument(
      "--store",
      default="demo_out/memory/lumen",
      help="a LUMEN (vectors) memory store; skipped when missing",
  )
  p.add_argument(
      "--store-subspaces",
      type=int,
      nargs="+",
      default=[16, 8],
      help="G settings for --store (the demo's d = 128: 16x and 32x)",
  )
  p.add_argument("--no-synthetic", action="store_true")
  p.add_argument("--bits", type=int, default=8)
  p.add_argument("--n-train", type=int, default=50_000)
  p.add_argument("--n-eval", type=int, default=20_000)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=4096)
  p.add_argument(
      "--ema-decay",
      type=float,
      default=0.9,
      help="0.999 in MEMORY-VQ's long runs; a short standalone fit needs less",
  )
  p.add_argument("--init-lloyd-iters", type=int, default=0)
  p.add_argument("--init-rounds", type=int, default=256)
  p.add_argument("--chunk-size", type=int, default=pq_codec.DEFAULT_CHUNK_SIZE)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--decode-repeats", type=int, default=20)
  p.add_argument("--decode-rounds", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(RESULTS / "pq_vs_faiss"))
  args = p.parse_args()

  datasets = []  # (name, train, eval, [G, ...])
  if not args.no_synthetic:
    for d, g in ((128, 16), (512, 64)):
      x = correlated_gaussian(args.n_train + args.n_eval, d, args.seed + d)
      datasets.append(("synthetic-gauss", x[: args.n_train], x[args.n_train :], [g]))

  def add(name, x, subspaces):
    x = x[np.random.default_rng(args.seed).permutation(len(x))]
    n_eval = min(args.n_eval, len(x) // 5)
    datasets.append((name, x[n_eval:][: args.n_train], x[:n_eval], subspaces))

  if args.store and os.path.exists(os.path.join(args.store, "COMPLETE")):
    add("trained-lumen-memory", store_vectors(args.store), args.store_subspaces)
  if args.vectors:
    x = np.load(args.vectors).astype(np.float32)
    if x.ndim != 2:
      raise ValueError(f"--vectors {args.vectors}: expected [N, d], got shape {x.shape}")
    add(pathlib.Path(args.vectors).stem, x, args.subspaces)
  if not datasets:
    p.error("nothing to run: --no-synthetic without --vectors")

  rows = [
      run_setting(name, tr, ev, g, args.bits, args) for name, tr, ev, gs in datasets for g in gs
  ]
  print_table(rows)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {
      "backend": jax.devices()[0].platform,
      "cpu_count": os.cpu_count(),
      "faiss_threads": faiss.omp_get_max_threads(),
      "jax": jax.__version__,
      "faiss": faiss.__version__,
      "args": vars(args),
  }
  tmp = out.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  os.replace(tmp, out.with_suffix(".json"))
  plot(rows, out.with_suffix(".png"))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
