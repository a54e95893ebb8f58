"""VQ attention vs dense attention: time and peak memory vs length, and quality.

  python benchmarks/vq_attention.py               # speed (~10-17 min on 2 cores) + quality (~30)
  python benchmarks/vq_attention.py --skip_quality  # speed and memory only
  python benchmarks/vq_attention.py --skip_speed    # quality only; keeps the speed rows

1. Speed: one causal self-attention layer (projections included) of the T5 network,
   `decoder_self_attention='vq'` vs 'dense', same shape, float32 on CPU: forward and
   forward+backward seconds, and XLA's compiled peak memory (temp + output bytes from
   `memory_analysis()`); dense runs only where its compiled memory fits --dense_limit_gb.
   The log-log slope of vq time vs length (target <= 1.1) and dense/vq at 8k (target >= 3x).
2. Associative recall over --recall_length tokens: --recall_pairs key-value pairs
   (one token each) scattered over the first half among filler, then every key again, each to
   be answered with its value; accuracy on those answers of a 2-layer decoder trained the same
   steps with dense and with vq self-attention (and vq with `far_key_gradient`, whose
   summarised keys get dense attention's gradient), over --seeds seeds. Blocks of
   --quality_block_length (T5's biases reach as far): every pair lies beyond the exact window
   of its queries, so vq must retrieve it through the compressed cache.
3. Bits per byte of the same decoder as a byte LM on long documents: the demo world's
   pages (`lumenvq.data.demo_world`) joined into one text, cut into --lm_length windows,
   the last tenth held out.

Writes benchmarks/results/vq_attention.json and vq_attention.png (time vs length, log-log).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=g-import-not-at-top,wrong-import-position

from lumenvq.data import demo_world  # pylint: disable=wrong-import-position
from lumenvq.model import models, network, vq_attention  # pylint: disable=wrong-import-position
from lumenvq.model.network_config import T5Config  # pylint: disable=wrong-import-position
from lumenvq.model.vq_attention import (  # pylint: disable=wrong-import-position
    VQAttentionConfig,
)


def _flags():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--num_codes", type=int, default=512)
  p.add_argument("--block_length", type=int, default=512)
  p.add_argument("--dense_limit_gb", type=float, default=5.0)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--recall_length", type=int, default=512)
  p.add_argument("--recall_pairs", type=int, default=16)
  p.add_argument("--recall_steps", type=int, default=1000)
  p.add_argument("--lm_length", type=int, default=512)
  p.add_argument("--lm_steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--quality_block_length", type=int, default=32)
  p.add_argument("--quality_num_codes", type=int, default=256)
  p.add_argument("--quality_ema_decay", type=float, default=0.99)
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument(
      "--quality_kinds",
      default="dense,vq",
      help="attention kinds the quality runs train (of %s)" % ", ".join(QUALITY_KINDS),
  )
  p.add_argument(
      "--keep_quality_rows",
      action="store_true",
      help="keep the last JSON's quality rows of the kinds not in --quality_kinds",
  )
  p.add_argument(
      "--skip_quality", action="store_true", help="leave out the quality comparisons (30 min)"
  )
  p.add_argument(
      "--skip_speed",
      action="store_true",
      help="keep the speed rows of the last results JSON (re-run quality only)",
  )
  return p.parse_args()


# ---------------------------------------------------------------------------
# 1. Speed and memory of one attention layer.


class _SelfAttention(nn.Module):
  """The decoder's self-attention sublayer with its stack's relative position biases."""

  config: T5Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    relpos = network.RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
    mask = jnp.ones(x.shape[:2], jnp.bool_)
    if cfg.decoder_self_attention == "vq":
      bias = vq_attention.block_bias(relpos, None, mask, cfg.vq_attention, bidirectional=False)
    else:
      pos = jnp.arange(x.shape[1])[None]
      causal = (pos[:, :, None] >= pos[:, None, :])[:, None]
      bias = relpos(pos, pos) + network.mask_bias(causal, cfg.dtype)
    return network.MultiHeadAttention(cfg, name="attention")(x, x, bias, deterministic=True)


def _attention_fns(config, length, kind):
  """Jitted forward and forward+backward of one self-attention sublayer, and its args."""
  layer = _SelfAttention(dataclasses.replace(config, decoder_self_attention=kind))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, length, config.emb_dim), jnp.float32)
  variables = layer.init(jax.random.PRNGKey(1), x[:, :16])

  def loss(params, x):
    return jnp.mean(layer.apply({**variables, "params": params}, x) ** 2)

  forward = jax.jit(lambda params, x: layer.apply({**variables, "params": params}, x))
  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return forward, fwd_bwd, (variables["params"], x)


def _best_seconds(compiled, args, repeats):
  """Best of `repeats` calls of an AOT-compiled fn, without report.best_times' warm-up
  call: compilation is done, and a dense 8k backward takes minutes on 2 busy cores."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _peak_bytes(compiled):
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def speed(flags):
  config = T5Config(
      vocab_size=8,
      emb_dim=flags.heads * flags.head_dim,
      num_heads=flags.heads,
      head_dim=flags.head_dim,
      dropout_rate=0.0,
      dtype="float32",
      vq_attention=VQAttentionConfig(num_codes=flags.num_codes, block_length=flags.block_length),
  )
  rows = []
  for length in [int(n) for n in flags.lengths.split(",")]:
    for kind in ("vq", "dense"):
      fns = _attention_fns(config, length, kind)
      row = {"length": length, "attention": kind}
      for name, fn in (("fwd", fns[0]), ("fwd_bwd", fns[1])):
        compiled = fn.lower(*fns[2]).compile()
        row[f"{name}_peak_mb"] = _peak_bytes(compiled) / 2**20
        if row[f"{name}_peak_mb"] > flags.dense_limit_gb * 1024:
          row[f"{name}_s"] = None  # does not fit: not run
          continue
        row[f"{name}_s"] = _best_seconds(compiled, fns[2], flags.repeats)
      rows.append(row)
      print(row, flush=True)
  return rows


def _slope(rows, key):
  pts = [(r["length"], r[key]) for r in rows if r["attention"] == "vq" and r[key]]
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def _ratio(rows, length, key):
  by = {r["attention"]: r for r in rows if r["length"] == length}
  if len(by) < 2 or not by["dense"].get(key) or not by["vq"].get(key):
    return None
  return by["dense"][key] / by["vq"][key]


# ---------------------------------------------------------------------------
# 2./3. Quality: a 2-layer decoder (the encoder has no layer) trained with dense and vq.

# Token ids: one per (key, value) pair, then the keys as queries, the values as answers, filler.
NUM_KEYS = NUM_VALUES = 16
PAIR, QUERY = 2, 2 + NUM_KEYS * NUM_VALUES
ANSWER = QUERY + NUM_KEYS
FILLER = ANSWER + NUM_VALUES
RECALL_VOCAB = FILLER + 1


def recall_batch(rng, batch, length, pairs):
  """`pairs` pair tokens (key k, value v) at random places of the first half, filler around
  them, then the keys in a new order as `query(k) answer(v)`; loss and accuracy on the answers
  only (chance: 1 / NUM_VALUES). A pair is one token so that one attention hop recalls it
  (the two-token pairs of Zoology's MQAR took a 2-layer model here far more steps)."""
  targets = np.full((batch, length), FILLER, np.int32)
  weights = np.zeros((batch, length), np.float32)
  for row in range(batch):
    keys = rng.choice(NUM_KEYS, pairs, replace=False)
    values = rng.randint(0, NUM_VALUES, pairs)
    where = np.sort(rng.choice(length // 2, pairs, replace=False))
    targets[row, where] = PAIR + keys * NUM_VALUES + values
    order = rng.permutation(pairs)
    queries = np.stack([QUERY + keys[order], ANSWER + values[order]], 1).reshape(-1)
    targets[row, length - 2 * pairs :] = queries
    weights[row, length - 2 * pairs + 1 :: 2] = 1.0
  return targets, weights


def lm_windows(length, num_entities=3000):
  """Byte windows (ids = byte + 3) of the demo world's pages joined into one document."""
  world = demo_world.build_world(0, num_entities)
  text = "\n".join("".join(page["text"]) for page in world.pages).encode("utf-8")
  ids = np.frombuffer(text, np.uint8).astype(np.int32) + 3
  n = len(ids) // length
  windows = ids[: n * length].reshape(n, length)
  held_out = max(1, n // 10)
  return windows[:-held_out], windows[-held_out:]


# Quality runs: name -> (T5Config.decoder_self_attention, VQAttentionConfig.far_key_gradient).
QUALITY_KINDS = {"dense": ("dense", False), "vq": ("vq", False), "vq_key_gradient": ("vq", True)}


def _quality_model(kind, vocab, block_length, num_codes, ema_decay):
  attention, far_key_gradient = QUALITY_KINDS[kind]
  config = T5Config(
      vocab_size=vocab,
      emb_dim=64,
      num_heads=4,
      head_dim=16,
      mlp_dim=128,
      num_encoder_layers=0,
      num_decoder_layers=2,
      dropout_rate=0.0,
      dtype="float32",
      # T5's biases reach as far as the exact window (two blocks), no farther: a short block
      # puts most of the sequence behind the compressed cache at a length CPUs can train.
      relative_attention_max_distance=block_length,
      relative_attention_num_buckets=16,
      decoder_self_attention=attention,
      vq_attention=VQAttentionConfig(
          num_codes=num_codes,
          block_length=block_length,
          ema_decay=ema_decay,
          far_key_gradient=far_key_gradient,
      ),
  )
  return models.EncoderDecoderModel(config, z_loss=0.0)


def _batch(targets, weights):
  b = targets.shape[0]
  return {
      "encoder_input_tokens": np.ones((b, 1), np.int32),
      "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": weights,
  }


def train_and_eval(model, seed, steps, train_batch, eval_batches, lr=3e-3):
  """Adam over `steps` batches through the model's loss_fn (EMA codebooks as model state,
  as the trainer carries them); (eval metric sums, seconds)."""
  variables = model.get_initial_variables(jax.random.PRNGKey(seed))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, state, batch, rng):
    (loss, (metrics, state)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch, rng, state
    )
    del loss, metrics
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, state

  evaluate = jax.jit(model.eval_fn)
  start = time.perf_counter()
  rng = np.random.RandomState(seed)
  for i in range(steps):
    params, opt, state = step(
        params, opt, state, train_batch(rng), jax.random.PRNGKey(seed * 100003 + i)
    )
  sums = {}
  for batch in eval_batches:
    for k, v in evaluate(params, batch, state).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return sums, time.perf_counter() - start


def quality(flags):
  if not 0 < flags.recall_pairs <= min(NUM_KEYS, flags.recall_length // 4):
    raise SystemExit(
        f"--recall_pairs={flags.recall_pairs}: needs 1..{NUM_KEYS} distinct keys and"
        f" --recall_length >= 4 x pairs (got {flags.recall_length})"
    )
  rows = []
  eval_rng = np.random.RandomState(12345)
  recall_eval = [
      _batch(*recall_batch(eval_rng, flags.batch_size, flags.recall_length, flags.recall_pairs))
      for _ in range(4)
  ]
  lm_train, lm_test = lm_windows(flags.lm_length)
  lm_eval = [
      _batch(w, np.ones_like(w, np.float32))
      for w in np.array_split(lm_test, max(1, len(lm_test) // flags.batch_size))
  ]

  def lm_train_batch(rng):
    w = lm_train[rng.randint(0, len(lm_train), flags.batch_size)]
    return _batch(w, np.ones_like(w, np.float32))

  recall_train_batch = lambda rng: _batch(
      *recall_batch(rng, flags.batch_size, flags.recall_length, flags.recall_pairs)
  )
  for task, vocab, steps, train_batch, eval_batches in (
      ("recall", RECALL_VOCAB, flags.recall_steps, recall_train_batch, recall_eval),
      ("lm", 259, flags.lm_steps, lm_train_batch, lm_eval),
  ):
    for kind in flags.quality_kinds.split(","):
      for seed in range(flags.seeds):
        model = _quality_model(
            kind,
            vocab,
            flags.quality_block_length,
            flags.quality_num_codes,
            flags.quality_ema_decay,
        )
        sums, seconds = train_and_eval(model, seed, steps, train_batch, eval_batches)
        row = {"task": task, "attention": kind, "seed": seed, "steps": steps, "s": seconds}
        if task == "recall":
          row["accuracy"] = 100.0 * sums["correct"] / sums["weight"]
        else:
          row["bits_per_byte"] = sums["loss"] / sums["weight"] / np.log(2.0)
        rows.append(row)
        print(row, flush=True)
  return rows


def _summary(rows, task, key):
  out = {}
  for kind in QUALITY_KINDS:
    vals = [r[key] for r in rows if r["task"] == task and r["attention"] == kind]
    if vals:
      out[kind] = {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}
  return out


def _plot(rows):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, style in (("vq", "-o"), ("dense", "--s")):
    for key in ("fwd_s", "fwd_bwd_s"):
      pts = [(r["length"], r[key]) for r in rows if r["attention"] == kind and r[key]]
      if pts:
        ax.plot(*zip(*pts), style, label=f"{kind} {key[:-2]}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("tokens")
  ax.set_ylabel("seconds (best of repeats)")
  ax.set_title("one causal self-attention layer, CPU float32")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(report.RESULTS_DIR, "vq_attention.png")
  os.makedirs(report.RESULTS_DIR, exist_ok=True)
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


def _last_results():
  path = os.path.join(report.RESULTS_DIR, "vq_attention.json")
  if not os.path.exists(path):
    raise SystemExit(f"--skip_speed / --keep_quality_rows: no {path} to keep rows of")
  with open(path) as f:
    return path, json.load(f)


def main():
  flags = _flags()
  kinds = flags.quality_kinds.split(",")
  unknown = sorted(set(kinds) - set(QUALITY_KINDS))
  if unknown:
    raise SystemExit(f"--quality_kinds: unknown {unknown}; choose from {list(QUALITY_KINDS)}")
  # Read before the speed rows overwrite the JSON.
  last = _last_results() if flags.skip_speed or flags.keep_quality_rows else None
  if flags.skip_speed:
    path, rows = last[0], last[1]["rows"]
    print(f"speed rows kept from {path}")
  else:
    rows = speed(flags)
  columns = ["length", "attention", "fwd_s", "fwd_bwd_s", "fwd_peak_mb", "fwd_bwd_peak_mb"]
  report.print_table(rows, columns)
  summary = {
      "vq_slope_fwd": _slope(rows, "fwd_s"),
      "vq_slope_fwd_bwd": _slope(rows, "fwd_bwd_s"),
      "dense_over_vq_8k_fwd": _ratio(rows, 8192, "fwd_s"),
      "dense_over_vq_8k_fwd_bwd": _ratio(rows, 8192, "fwd_bwd_s"),
      "targets": {"vq_slope": "<= 1.1", "dense_over_vq_8k": ">= 3", "recall_gap_points": "<= 2"},
  }
  quality_rows, kept = [], {}
  if flags.skip_speed:
    kept["speed_rows_kept_from_an_earlier_run"] = True
  else:  # Written now and again after quality: speed survives an interrupt.
    report.write_results("vq_attention", rows, quality=[], summary=summary, flags=vars(flags))
    _plot(rows)
  if not flags.skip_quality:
    quality_rows = quality(flags)
    if flags.keep_quality_rows:
      old = [r for r in last[1]["quality"] if r["attention"] not in kinds]
      quality_rows = old + quality_rows
      kept["quality_rows_kept_from_an_earlier_run"] = sorted({r["attention"] for r in old})
    report.print_table(
        quality_rows, ["task", "attention", "seed", "steps", "accuracy", "bits_per_byte", "s"]
    )
    summary["recall_accuracy"] = acc = _summary(quality_rows, "recall", "accuracy")
    summary["lm_bits_per_byte"] = _summary(quality_rows, "lm", "bits_per_byte")
    for kind in ("vq", "vq_key_gradient"):
      if "dense" in acc and kind in acc:
        gap = acc["dense"]["mean"] - acc[kind]["mean"]
        summary["recall_gap_points" + kind[2:]] = gap
  for k, v in summary.items():
    print(f"{k}: {v}")
  report.write_results(
      "vq_attention", rows, quality=quality_rows, summary=summary, flags=vars(flags), **kept
  )


if __name__ == "__main__":
  main()
