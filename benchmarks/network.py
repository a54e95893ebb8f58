"""Forward and forward+backward tokens/s of the T5 1.1 network on this machine.

  python benchmarks/network.py

Sizes tiny and small (gin_configs/models), jit compile time reported apart from
the steady-state step time. Writes benchmarks/results/network.json and .png.
"""

import os
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=g-import-not-at-top,wrong-import-position

from lumenvq.model import losses, network  # pylint: disable=wrong-import-position
from lumenvq.model.network_config import T5Config  # pylint: disable=wrong-import-position

GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gin_configs", "models")
SETTINGS = {"tiny": (32, 64, 16), "small": (8, 128, 32)}  # batch, input len, target len
# small's gin file says bfloat16 (as on TPU); this CPU has no fast bf16 matmul,
# so float32 is measured beside it.
RUNS = [("tiny", None), ("small", None), ("small", "float32")]


def _config(size, dtype=None):
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_file(os.path.join(GIN_DIR, f"{size}.gin"))
    if dtype:
      gin.bind_parameter("T5Config.dtype", dtype)
    config = T5Config()
  gin.clear_config()
  return config


def bench(size, dtype):
  config = _config(size, dtype)
  batch, in_len, tgt_len = SETTINGS[size]
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(2, config.vocab_size, (batch, in_len)))
  tgt = jnp.asarray(rng.randint(2, config.vocab_size, (batch, tgt_len)))
  dec = jnp.concatenate([jnp.zeros((batch, 1), tgt.dtype), tgt[:, :-1]], axis=1)
  model = network.Transformer(config)
  params = nn.meta.unbox(network.init_variables(config, jax.random.PRNGKey(0))["params"])

  def loss_fn(p):
    logits = model.apply({"params": p}, enc, dec, tgt)
    loss, _, weight = losses.cross_entropy_with_logits(logits, tgt)
    return loss / weight

  forward = jax.jit(lambda p: model.apply({"params": p}, enc, dec, tgt))
  backward = jax.jit(jax.value_and_grad(loss_fn))
  tokens = batch * (in_len + tgt_len)
  rows = []
  for name, fn in [("forward", forward), ("forward+backward", backward)]:
    first, best = report.timed(fn, params)
    rows.append(
        {
            "size": size,
            "pass": name,
            "batch": batch,
            "input_len": in_len,
            "target_len": tgt_len,
            "dtype": jnp.dtype(config.dtype).name,
            "compile_s": first - best,
            "step_s": best,
            "tokens_per_s": tokens / best,
        }
    )
  return rows


def main():
  rows = [r for size, dtype in RUNS for r in bench(size, dtype)]
  report.print_table(
      rows,
      [
          "size",
          "pass",
          "batch",
          "input_len",
          "target_len",
          "dtype",
          "compile_s",
          "step_s",
          "tokens_per_s",
      ],
  )
  report.write_results("network", rows)
  report.bar_plot(
      "network",
      [f"{s} {d or ''}".strip() for s, d in RUNS],
      {
          p: [r["tokens_per_s"] for r in rows if r["pass"] == p]
          for p in ("forward", "forward+backward")
      },
      "tokens/s (CPU)",
      log=True,
  )


if __name__ == "__main__":
  main()
