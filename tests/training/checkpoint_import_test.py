"""Checkpoint import: the T5X format (msgpack + per-parameter tensorstore arrays),
and errors that name the parameter. Hugging Face parity is in hf_parity_test.py."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import tensorstore as ts

from lumenvq.model import network
from lumenvq.model.network_config import T5Config
from lumenvq.training import checkpoint_import, param_io

CONFIG = T5Config(
    vocab_size=40,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=24,
    num_encoder_layers=1,
    num_decoder_layers=2,
)


def _write_t5x_checkpoint(directory, params, inline=("encoder/encoder_norm/scale",)):
  """A T5X checkpoint_N directory: msgpack `checkpoint` whose optimizer/target
  leaves are arrays (small ones) or specs of zarr arrays beside it."""
  os.makedirs(directory)
  target = {}
  for name, value in param_io.flat_names(params).items():
    value = np.asarray(value, np.float32)
    if name in inline:
      leaf = value
    else:
      rel = "target." + name.replace("/", ".")
      spec = {
          "driver": "zarr",
          "kvstore": {"driver": "file", "path": rel},
          "metadata": {
              "shape": list(value.shape),
              "chunks": list(value.shape),
              "dtype": "<f4",
              "compressor": {"id": "gzip"},
          },
      }
      absolute = json.loads(json.dumps(spec))
      absolute["kvstore"]["path"] = os.path.join(directory, rel)
      ts.open(absolute, create=True).result().write(value).result()
      leaf = spec
    target[tuple(name.split("/"))] = leaf
  contents = {
      "version": 3,
      "optimizer": {
          "target": flax.traverse_util.unflatten_dict(target),
          "state": {"step": np.int64(1000), "param_states": {}},
      },
  }
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(contents))


def _params():
  return jax.tree_util.tree_map(
      np.asarray, network.init_variables(CONFIG, jax.random.PRNGKey(3))["params"]
  )


def test_t5x_checkpoint_converts_exactly(tmp_path):
  params = flax.linen.meta.unbox(_params())
  src = str(tmp_path / "checkpoint_1000")
  _write_t5x_checkpoint(src, params)
  dst = tmp_path / "out"
  config = checkpoint_import.convert("t5x", src, str(dst), CONFIG)
  assert config == CONFIG
  restored = param_io.restore_params(str(dst / "params"), network.abstract_params(CONFIG))
  for name, value in param_io.flat_names(params).items():
    np.testing.assert_array_equal(param_io.flat_names(restored)[name], value)
  assert "T5Config.num_decoder_layers = 2" in (dst / "model.gin").read_text()


def test_t5x_shape_mismatch_names_parameter(tmp_path):
  params = flax.linen.meta.unbox(_params())
  params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((25, 16), np.float32)
  src = str(tmp_path / "checkpoint_1")
  _write_t5x_checkpoint(src, params)
  with pytest.raises(ValueError, match=r"decoder/layers_1/mlp/wo/kernel has shape \(25, 16\)"):
    checkpoint_import.convert("t5x", src, str(tmp_path / "out"), CONFIG)
  assert not (tmp_path / "out").exists()


def test_t5x_missing_and_unexpected_parameters(tmp_path):
  params = flax.linen.meta.unbox(_params())
  del params["encoder"]["layers_0"]["mlp"]["wi_1"]
  _write_t5x_checkpoint(str(tmp_path / "a"), params)
  with pytest.raises(ValueError, match="encoder/layers_0/mlp/wi_1/kernel is missing"):
    checkpoint_import.convert("t5x", str(tmp_path / "a"), str(tmp_path / "o"), CONFIG)
  params = flax.linen.meta.unbox(_params())
  params["encoder"]["extra"] = {"kernel": np.zeros((2,), np.float32)}
  _write_t5x_checkpoint(str(tmp_path / "b"), params)
  with pytest.raises(ValueError, match="encoder/extra/kernel has no place"):
    checkpoint_import.convert("t5x", str(tmp_path / "b"), str(tmp_path / "o"), CONFIG)


def test_hf_errors_name_tensor(tmp_path):
  (tmp_path / "config.json").write_text(
      json.dumps(
          {
              "d_model": 16,
              "d_ff": 24,
              "d_kv": 8,
              "num_heads": 2,
              "num_layers": 1,
              "num_decoder_layers": 1,
              "vocab_size": 40,
              "feed_forward_proj": "gated-gelu",
              "tie_word_embeddings": False,
          }
      )
  )
  from safetensors.numpy import save_file

  save_file({"shared.weight": np.zeros((40, 16), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight"):
    checkpoint_import.convert("hf", str(tmp_path), str(tmp_path / "o"))
  save_file(
      {
          "shared.weight": np.zeros((40, 16), np.float32),
          "lm_head.weight": np.zeros((40, 16), np.float32),
      },
      str(tmp_path / "model.safetensors"),
  )
  with pytest.raises(
      ValueError,
      match=r"tensor decoder.final_layer_norm.weight "
      r"\(for parameter decoder/decoder_norm/scale\) is missing",
  ):
    checkpoint_import.convert("hf", str(tmp_path), str(tmp_path / "o"))
  (tmp_path / "config.json").write_text(
      json.dumps(
          {
              "d_model": 16,
              "d_ff": 24,
              "d_kv": 8,
              "num_heads": 2,
              "num_layers": 1,
              "vocab_size": 40,
              "feed_forward_proj": "relu",
          }
      )
  )
  with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
    checkpoint_import.convert("hf", str(tmp_path), str(tmp_path / "o"))


def test_t5x_cli_takes_gin_dimensions(tmp_path):
  src = str(tmp_path / "checkpoint_1000")
  _write_t5x_checkpoint(src, flax.linen.meta.unbox(_params()))
  gin_file = tmp_path / "model.gin"
  gin_file.write_text(checkpoint_import.config_gin(CONFIG))
  dst = tmp_path / "out"
  subprocess.run(
      [
          sys.executable,
          "-m",
          "lumenvq.convert_checkpoint",
          "--from",
          "t5x",
          src,
          "--to",
          str(dst),
          f"--gin_file={gin_file}",
      ],
      check=True,
  )
  assert (dst / "model.gin").read_text() == gin_file.read_text()
  failed = subprocess.run(
      [
          sys.executable,
          "-m",
          "lumenvq.convert_checkpoint",
          "--from",
          "t5x",
          src,
          "--to",
          str(tmp_path / "o2"),
          f"--gin_file={gin_file}",
          "--gin=T5Config.mlp_dim=32",
      ],
      capture_output=True,
      text=True,
  )
  assert failed.returncode == 1
  assert (
      "layers_0/mlp/wi_0/kernel has shape (16, 24), the gin config implies (16, 32)"
      in failed.stderr
  )


def test_help_documents_both_sources():
  out = subprocess.run(
      [sys.executable, "-m", "lumenvq.convert_checkpoint", "--help"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  assert "--from {hf,t5x}" in out and "config.json" in out and "msgpack" in out
