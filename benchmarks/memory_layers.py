"""memory+ layers: lookup throughput of the embedding bag, and closed-book factual recall.

    .venv/bin/python benchmarks/memory_layers.py [--part lookup|recall|all]
        [--steps 500] [--seeds 2] [--num_entities 800] [--pq_steps 50]

Lookup: tokens/s and effective GB/s of value bytes read (T tokens x heads*knn rows x value
dim x 4 B) of `embedding_bag` (model/embedding_bag.py) against a plain `jnp.take` + weighted
sum under autodiff, forward and forward+backward, at N = 2^16 and 2^20 rows, beside the
machine's memory-copy bandwidth (numpy copy of 256 MB: bytes read per second).

Recall: closed-book QA on the demo world (`lumenvq.data.demo_world`, generated in-process):
every single-hop question of every fact (the NQ-style templates) with no passage, so the
answer must come from the parameters; EM = exact match of the greedy answer tokens on the
training questions (what the parameters hold after the same steps). Models: the same small
T5 dense; with memory+ in encoder layer 1 (replacing its MLP; same d_model, depth, steps,
seed); a dense model whose wider MLPs hold ~the memory's parameter count; and the memory+
model continued for --pq_steps with PQ values (straight-through, EMA codebooks), then
evaluated from the codes alone. FLOPs/token from XLA's cost analysis of the teacher-forced
forward. Writes benchmarks/results/memory_layers.json and memory_layers.png.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import re
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from lumenvq.data.demo_world import RELATIONS, build_world
from lumenvq.model import memory_plus, models
from lumenvq.model.embedding_bag import embedding_bag
from lumenvq.model.memory_plus_config import MemoryPlusConfig
from lumenvq.model.network_config import T5Config
from lumenvq.training import optimizers

# ---------------------------------------------------------------------------------------------
# Lookup throughput.


def memcpy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return nbytes / best / 1e9


def _take_bag(table, indices, weights):
  return jnp.sum(jnp.take(table, indices, axis=0) * weights[..., None], axis=-2)


def lookup_rows(tokens: int, heads: int, knn: int, value_dim: int, repeats: int):
  copy = memcpy_gbps()
  rows = []
  for log_n in (16, 20):
    n = 1 << log_n
    key = jax.random.PRNGKey(log_n)
    table = jax.random.normal(key, (n, value_dim), jnp.float32)
    indices = jax.random.randint(jax.random.fold_in(key, 1), (tokens, heads * knn), 0, n)
    weights = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 2), indices.shape))
    cot = jax.random.normal(jax.random.fold_in(key, 3), (tokens, value_dim))

    def fwd_bwd(bag):
      return jax.jit(jax.grad(lambda t, w: jnp.sum(bag(t, indices, w) * cot), argnums=(0, 1)))

    fns = {
        ("embedding_bag", "forward"): jax.jit(embedding_bag),
        ("take+sum", "forward"): jax.jit(_take_bag),
        ("embedding_bag", "forward+backward"): fwd_bwd(embedding_bag),
        ("take+sum", "forward+backward"): fwd_bwd(_take_bag),
    }
    calls = {
        k: (lambda f=f, p=k[1]: f(table, indices, weights) if p == "forward" else f(table, weights))
        for k, f in fns.items()
    }
    best = report.best_times(calls, repeats)
    read = tokens * heads * knn * value_dim * 4
    for (impl, part), seconds in best.items():
      gbps = read / seconds / 1e9
      rows.append(
          {
              "N": n,
              "impl": impl,
              "pass": part,
              "ms": seconds * 1e3,
              "tokens_per_s": tokens / seconds,
              "value_GB_per_s": gbps,
              "memcpy_GB_per_s": copy,
              "fraction_of_memcpy": gbps / copy,
          }
      )
  return rows


# ---------------------------------------------------------------------------------------------
# Closed-book factual recall.

_WORD = re.compile(r"\w+|[^\w\s]")


def recall_data(num_entities: int, seed: int = 0):
  """(inputs [n, Li], targets [n, Lt]) int32 over a word vocabulary (0 pad, 1 eos)."""
  world = build_world(seed, num_entities)
  pairs = [
      (q.format(s=world.entities[e.index].name), world.value_text(r, v))
      for e, r, v in world.facts()
      for q in RELATIONS[r].questions
  ]
  vocab = {}
  encode = lambda text: [vocab.setdefault(w, len(vocab) + 2) for w in _WORD.findall(text.lower())]
  q_ids = [encode(q) + [1] for q, _ in pairs]
  a_ids = [encode(a) + [1] for _, a in pairs]
  li, lt = max(map(len, q_ids)), max(map(len, a_ids))
  inputs = np.zeros((len(pairs), li), np.int32)
  targets = np.zeros((len(pairs), lt), np.int32)
  for i, (q, a) in enumerate(zip(q_ids, a_ids)):
    inputs[i, : len(q)], targets[i, : len(a)] = q, a
  return inputs, targets, len(vocab) + 2


def _batch(inputs, targets):
  return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.float32),
  }


def _count(tree):
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def _flops_per_token(model, params, state, batch):
  compiled = jax.jit(model.eval_fn).lower(params, batch, state).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tokens = float(np.sum(batch["encoder_input_tokens"] > 0) + np.sum(batch["decoder_loss_weights"]))
  return float(cost["flops"]) / tokens


def _copy_params(dst, src):
  """dst's parameters with every same-named, same-shaped one of src (warm start)."""
  s = flax.traverse_util.flatten_dict(src)
  d = flax.traverse_util.flatten_dict(dst)
  return flax.traverse_util.unflatten_dict(
      {k: s[k] if k in s and s[k].shape == v.shape else v for k, v in d.items()}
  )


@dataclasses.dataclass
class Run:
  params: dict
  state: dict
  step_s: float


def train(model, data, steps, seed, batch_size, values_lr, init=None):
  inputs, targets = data
  variables = model.get_initial_variables(jax.random.PRNGKey(seed))
  params = nn.unbox(variables["params"])
  state = {k: nn.unbox(v) for k, v in variables.items() if k != "params"}
  if init is not None:
    params = _copy_params(params, init.params)
  groups = {}
  if model.config.memory_plus is not None and model.config.memory_plus.value_storage != "pq_codes":
    groups = {"memory_plus_values/": optimizers.adamw(values_lr, weight_decay=0.0)}
  opt = optimizers.make_optimizer(
      optimizers.adafactor, optimizers.constant_schedule(0.01), param_groups=groups
  )
  opt_state = opt.tx.init(params)

  @jax.jit
  def step(params, opt_state, state, batch, rng):
    def loss(p):
      total, (metrics, new_state) = model.loss_fn(p, batch, rng, state)
      return total / metrics["weight"], new_state

    grads, new_state = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = opt.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_state

  rng = np.random.default_rng(seed)
  order = np.concatenate(
      [rng.permutation(len(inputs)) for _ in range(steps * batch_size // len(inputs) + 2)]
  )
  times = []
  for i in range(steps):
    idx = order[i * batch_size : (i + 1) * batch_size]
    batch = _batch(inputs[idx], targets[idx])
    start = time.perf_counter()
    params, opt_state, state = step(params, opt_state, state, batch, jax.random.PRNGKey(i))
    if i >= steps - 20:
      jax.block_until_ready(params)
      times.append(time.perf_counter() - start)
  return Run(params, state, statistics.median(times))


def exact_match(model, run, data, batch_size=512):
  inputs, targets = data
  predict = jax.jit(lambda p, s, b: model.predict_batch(p, b, model_state=s))
  hits = 0
  for i in range(0, len(inputs), batch_size):
    b = _batch(inputs[i : i + batch_size], targets[i : i + batch_size])
    pred = np.asarray(predict(run.params, run.state, b))
    want = b["decoder_target_tokens"]
    hits += int(np.sum(np.all((pred == want) | (want == 0), axis=1)))
  return hits / len(inputs)


def recall_rows(args):
  inputs, targets, vocab = recall_data(args.num_entities)
  data = (inputs, targets)
  base = dict(
      vocab_size=-(-vocab // 8) * 8,
      emb_dim=args.emb_dim,
      num_heads=4,
      head_dim=args.emb_dim // 4,
      mlp_dim=2 * args.emb_dim,
      num_encoder_layers=2,
      num_decoder_layers=2,
      dropout_rate=0.0,
      dtype="float32",
  )
  plus = MemoryPlusConfig(
      encoder_layers=(1,),
      n_keys=args.n_keys,
      heads=4,
      knn=args.knn,
      key_dim=args.key_dim,
      pq_subspaces=args.pq_subspaces,
      pq_codebook_size=256,
  )
  memory_params = plus.num_values * args.emb_dim
  mlps = base["num_encoder_layers"] + base["num_decoder_layers"]
  wide_mlp = base["mlp_dim"] + memory_params // (3 * args.emb_dim * mlps)
  configs = {
      "dense": T5Config(**base),
      "memory+": T5Config(**base, memory_plus=plus),
      f"dense, mlp_dim {wide_mlp}": T5Config(**{**base, "mlp_dim": wide_mlp}),
  }
  probe = _batch(inputs[: args.batch_size], targets[: args.batch_size])
  rows, runs = [], {}
  for name, cfg in configs.items():
    seeds = range(args.seeds) if name in ("dense", "memory+") else range(1)
    for seed in seeds:
      model = models.EncoderDecoderModel(cfg)
      start = time.perf_counter()
      run = train(model, data, args.steps, seed, args.batch_size, args.values_lr)
      em = exact_match(model, run, data)
      runs[name, seed] = (model, run)
      rows.append(
          {
              "model": name,
              "seed": seed,
              "EM": em,
              "params_M": _count(run.params) / 1e6,
              "value_bytes": memory_params * 4 if cfg.memory_plus else 0,
              "flops_per_token": _flops_per_token(model, run.params, run.state, probe),
              "step_ms": run.step_s * 1e3,
              "train_s": time.perf_counter() - start,
          }
      )
      print(rows[-1], flush=True)
  # PQ values: continue the float memory+ model (seed 0) with the quantizer, then read codes.
  model_f, run_f = runs["memory+", 0]
  pq_train = models.EncoderDecoderModel(
      T5Config(**base, memory_plus=dataclasses.replace(plus, value_storage="pq_train"))
  )
  start = time.perf_counter()
  run_q = train(pq_train, data, args.pq_steps, 0, args.batch_size, args.values_lr, init=run_f)
  float_more = train(model_f, data, args.pq_steps, 0, args.batch_size, args.values_lr, init=run_f)
  code_params, code_state = memory_plus.export_pq_values(run_q.params, run_q.state)
  pq_codes = models.EncoderDecoderModel(
      T5Config(**base, memory_plus=dataclasses.replace(plus, value_storage="pq_codes"))
  )
  run_c = Run(code_params, code_state, run_q.step_s)
  code_bytes = (
      plus.num_values * plus.pq_subspaces
      + plus.pq_subspaces * 256 * (args.emb_dim // plus.pq_subspaces) * 4
  )
  for name, model, run, value_bytes in (
      (f"memory+ float, +{args.pq_steps} steps", model_f, float_more, memory_params * 4),
      (
          f"memory+ PQ codes (G={plus.pq_subspaces}, C=256), +{args.pq_steps} steps",
          pq_codes,
          run_c,
          code_bytes,
      ),
  ):
    rows.append(
        {
            "model": name,
            "seed": 0,
            "EM": exact_match(model, run, data),
            "params_M": (_count(run.params) + (memory_params if model is pq_codes else 0)) / 1e6,
            "value_bytes": value_bytes,
            "flops_per_token": _flops_per_token(model, run.params, run.state, probe),
            "step_ms": run.step_s * 1e3,
            "train_s": time.perf_counter() - start,
        }
    )
    print(rows[-1], flush=True)
  return rows, {"facts_questions": len(inputs), "vocab": vocab, "steps": args.steps}


def _summary(rows):
  """Mean and spread (max - min over seeds) of EM per model."""
  out = {}
  for r in rows:
    out.setdefault(r["model"], []).append(r["EM"])
  return {
      k: {"mean_EM": float(np.mean(v)), "spread_EM": float(np.ptp(v)), "seeds": len(v)}
      for k, v in out.items()
  }


def plot(recall, lookup):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  if recall:
    for r in recall:
      a.scatter(r["params_M"], r["EM"], label=f"{r['model']} (seed {r['seed']})")
    a.set_xlabel("parameters (M)")
    a.set_ylabel("closed-book EM")
    a.legend(fontsize=6)
  if lookup:
    for impl in ("embedding_bag", "take+sum"):
      for part in ("forward", "forward+backward"):
        pts = [r for r in lookup if r["impl"] == impl and r["pass"] == part]
        b.plot(
            [r["N"] for r in pts], [r["value_GB_per_s"] for r in pts], "o-", label=f"{impl} {part}"
        )
    b.axhline(lookup[0]["memcpy_GB_per_s"], color="k", ls="--", label="memcpy")
    b.set_xscale("log", base=2)
    b.set_xlabel("N values")
    b.set_ylabel("value GB/s read")
    b.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(report.RESULTS_DIR, "memory_layers.png")
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("lookup", "recall", "all"), default="all")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--value_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num_entities", type=int, default=800)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--pq_steps", type=int, default=50)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--emb_dim", type=int, default=64)
  parser.add_argument("--n_keys", type=int, default=128)
  parser.add_argument("--knn", type=int, default=16)
  parser.add_argument("--key_dim", type=int, default=16)
  parser.add_argument("--pq_subspaces", type=int, default=16)
  parser.add_argument("--values_lr", type=float, default=1e-2)
  args = parser.parse_args()
  lookup, recall, extra = [], [], {}
  if args.part in ("lookup", "all"):
    lookup = lookup_rows(args.tokens, 4, 32, args.value_dim, args.repeats)
    report.print_table(lookup, list(lookup[0]))
  if args.part in ("recall", "all"):
    recall, extra = recall_rows(args)
    report.print_table(recall, list(recall[0]))
    extra["em_by_model"] = _summary(recall)
    print(extra["em_by_model"])
  report.write_results(
      "memory_layers", {"lookup": lookup, "recall": recall}, settings=vars(args), **extra
  )
  plot(recall, lookup)


if __name__ == "__main__":
  main()
