"""Train-step throughput (steps/s, tokens/s) of the tiny and small models on 1 and 8
CPU devices, and checkpoint save / restore seconds.

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--small_steps 2]

Prints a table and writes benchmarks/results/train_step.json. CPU numbers
measure the framework's overhead and scaling shape, not accelerator speed;
`small` runs with short sequences to keep this under a few minutes.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import platform
import tempfile
import time

import gin
import jax

from lumenvq.data import copy_task
from lumenvq.model import models
from lumenvq.model.network_config import T5Config
from lumenvq.training import checkpoints, input_pipeline, optimizers, partitioning, trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(size: str) -> T5Config:
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", f"{size}.gin"))
  return T5Config()


def bench(size, num_devices, steps, batch_size, lengths, measure_checkpoint):
  model = models.EncoderDecoderModel(_config(size))
  mesh = partitioning.make_mesh((num_devices, 1), devices=jax.devices()[:num_devices])
  t = trainer_lib.Trainer(
      model, optimizers.make_optimizer(), mesh, partitioning.standard_logical_axis_rules()
  )
  layout = input_pipeline.data_layout(mesh, batch_size)
  stream = input_pipeline.train_batches(
      copy_task.CopySource("lumenvq_debug_copy", lengths),
      model.feature_converter(lengths),
      layout,
      0,
  )
  batches = [input_pipeline.to_global(next(stream), mesh, batch_size) for _ in range(steps + 1)]
  state = t.init_state()
  begin = time.perf_counter()
  state, metrics = t.train_step(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - begin
  tokens = 0.0
  begin = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = t.train_step(state, batch)
    tokens += float(metrics["tokens"])  # Also waits for the step.
  elapsed = time.perf_counter() - begin
  row = {
      "model": size,
      "devices": num_devices,
      "batch": batch_size,
      "lengths": f"{lengths['inputs']}/{lengths['targets']}",
      "steps": steps,
      "compile_and_first_step_s": round(compile_s, 2),
      "steps_per_s": round(steps / elapsed, 3),
      "tokens_per_s": round(tokens / elapsed, 1),
      "params_M": round(sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e6, 2),
  }
  if measure_checkpoint:
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoints.Checkpointer(tmp, save_every=1, keep=1)
      begin = time.perf_counter()
      ckpt.save(1, state)
      blocking = time.perf_counter() - begin
      ckpt.wait()
      row["ckpt_save_blocking_s"] = round(blocking, 2)
      row["ckpt_save_total_s"] = round(time.perf_counter() - begin, 2)
      begin = time.perf_counter()
      restored = ckpt.restore(t.abstract_state())
      jax.block_until_ready(restored)
      row["ckpt_restore_s"] = round(time.perf_counter() - begin, 2)
      ckpt.close()
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps for tiny")
  parser.add_argument("--small_steps", type=int, default=2, help="timed steps for small")
  parser.add_argument(
      "--out", default=os.path.join(REPO, "benchmarks", "results", "train_step.json")
  )
  args = parser.parse_args()
  rows = []
  for size, steps, batch, lengths in [
      ("tiny", args.steps, 16, {"inputs": 64, "targets": 16}),
      ("small", args.small_steps, 8, {"inputs": 32, "targets": 8}),
  ]:
    for num_devices in (1, 8):
      rows.append(
          bench(size, num_devices, steps, batch, lengths, measure_checkpoint=num_devices == 8)
      )
      print(rows[-1], flush=True)
  columns = [
      "model",
      "devices",
      "batch",
      "lengths",
      "params_M",
      "compile_and_first_step_s",
      "steps_per_s",
      "tokens_per_s",
      "ckpt_save_blocking_s",
      "ckpt_save_total_s",
      "ckpt_restore_s",
  ]
  print(" | ".join(columns))
  for row in rows:
    print(" | ".join(str(row.get(c, "")) for c in columns))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
        {
            "backend": jax.default_backend(),
            "host_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "jax": jax.__version__,
            "rows": rows,
        },
        f,
        indent=2,
    )
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
