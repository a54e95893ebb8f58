"""Checkpoint import: T5 1.1 parameters from Hugging Face or T5X checkpoints, renamed to this
network's tree, checked parameter by parameter, and written as an orbax parameter checkpoint
with the T5Config it belongs to (the CLI is `python -m lumenvq.convert_checkpoint`).
"""

import glob
import json
import os
import re

import flax
import numpy as np
import tensorstore as ts

from lumenvq.model import network
from lumenvq.model.network_config import T5Config
from lumenvq.training import param_io

_HF_CONFIG_FIELDS = {  # T5Config field <- Hugging Face config.json key
    "vocab_size": "vocab_size",
    "emb_dim": "d_model",
    "num_heads": "num_heads",
    "num_encoder_layers": "num_layers",
    "num_decoder_layers": "num_decoder_layers",
    "head_dim": "d_kv",
    "mlp_dim": "d_ff",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
}

# (our name pattern, Hugging Face name template, transpose?)
_HF_RULES = [
    (r"token_embedder/embedding", "shared.weight", False),
    (
        r"(encoder|decoder)/relpos_bias/rel_embedding",
        "{0}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        True,
    ),
    (r"encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", False),
    (r"decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", False),
    (r"decoder/logits_dense/kernel", "lm_head.weight", True),
    (
        r"encoder/layers_(\d+)/pre_attention_layer_norm/scale",
        "encoder.block.{0}.layer.0.layer_norm.weight",
        False,
    ),
    (
        r"encoder/layers_(\d+)/attention/(query|key|value|out)/kernel",
        "encoder.block.{0}.layer.0.SelfAttention.{1}.weight",
        True,
    ),
    (
        r"encoder/layers_(\d+)/pre_mlp_layer_norm/scale",
        "encoder.block.{0}.layer.1.layer_norm.weight",
        False,
    ),
    (
        r"encoder/layers_(\d+)/mlp/(wi_0|wi_1|wo)/kernel",
        "encoder.block.{0}.layer.1.DenseReluDense.{1}.weight",
        True,
    ),
    (
        r"decoder/layers_(\d+)/pre_self_attention_layer_norm/scale",
        "decoder.block.{0}.layer.0.layer_norm.weight",
        False,
    ),
    (
        r"decoder/layers_(\d+)/self_attention/(query|key|value|out)/kernel",
        "decoder.block.{0}.layer.0.SelfAttention.{1}.weight",
        True,
    ),
    (
        r"decoder/layers_(\d+)/pre_cross_attention_layer_norm/scale",
        "decoder.block.{0}.layer.1.layer_norm.weight",
        False,
    ),
    (
        r"decoder/layers_(\d+)/encoder_decoder_attention/(query|key|value|out)/kernel",
        "decoder.block.{0}.layer.1.EncDecAttention.{1}.weight",
        True,
    ),
    (
        r"decoder/layers_(\d+)/pre_mlp_layer_norm/scale",
        "decoder.block.{0}.layer.2.layer_norm.weight",
        False,
    ),
    (
        r"decoder/layers_(\d+)/mlp/(wi_0|wi_1|wo)/kernel",
        "decoder.block.{0}.layer.2.DenseReluDense.{1}.weight",
        True,
    ),
]
_HF_PROJ = {"query": "q", "key": "k", "value": "v", "out": "o"}
# Copies of `shared.weight` that transformers writes for tied input embeddings.
_HF_ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def _read_hf_config(src: str) -> tuple[str, dict]:
  path = os.path.join(src, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (a Hugging Face T5 directory has config.json)")
  with open(path) as f:
    return path, json.load(f)


def hf_config(src: str) -> T5Config:
  path, cfg = _read_hf_config(src)
  proj = cfg.get("feed_forward_proj", "relu")
  if proj not in ("gated-gelu", "gated-gelu_new"):
    raise ValueError(
        f"{path}: feed_forward_proj={proj!r}; lumenvq's network is " "T5 1.1 (gated-gelu)"
    )
  kwargs = {
      ours: cfg[theirs] for ours, theirs in _HF_CONFIG_FIELDS.items() if cfg.get(theirs) is not None
  }
  kwargs.setdefault("num_decoder_layers", cfg["num_layers"])
  return T5Config(**kwargs)


def _hf_tensors(src: str) -> dict:
  files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
  if files:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    tensors = {}
    for f in files:
      tensors.update(load_file(f))
    return tensors
  bin_path = os.path.join(src, "pytorch_model.bin")
  if os.path.exists(bin_path):
    import torch  # pylint: disable=g-import-not-at-top

    return {
        k: v.float().numpy()
        for k, v in torch.load(bin_path, map_location="cpu", weights_only=True).items()
    }
  raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model.bin")


def _hf_name(name: str):
  for pattern, template, transpose in _HF_RULES:
    m = re.fullmatch(pattern, name)
    if m:
      groups = [_HF_PROJ.get(g, g) for g in m.groups()]
      return template.format(*groups), transpose
  raise ValueError(f"parameter {name} has no Hugging Face counterpart")


def _hf_head(src: str, tensors: dict) -> np.ndarray:
  """lm_head.weight as T5 1.1 uses it: untied and unscaled.

  Hub T5 1.1 files carry an untied `lm_head.weight`. transformers >= 5 always
  ties the head to `shared.weight` and records `scale_decoder_outputs`, whether
  the decoder output is scaled by d_model**-0.5 (original T5) or not (T5 1.1);
  that scale folds exactly into the kernel.
  """
  _, cfg = _read_hf_config(src)
  tied = cfg.get("tie_word_embeddings", True)
  scaled = cfg.get("scale_decoder_outputs", tied)
  if "lm_head.weight" in tensors:
    head = np.asarray(tensors["lm_head.weight"], np.float32)
  elif tied and "shared.weight" in tensors:
    head = np.asarray(tensors["shared.weight"], np.float32)
  else:
    raise ValueError(
        f"{src}: tensor lm_head.weight (for parameter " "decoder/logits_dense/kernel) is missing"
    )
  return head * (cfg["d_model"] ** -0.5 if scaled else 1.0)


def from_hf(src: str, config: T5Config):
  tensors = _hf_tensors(src)
  tensors["lm_head.weight"] = _hf_head(src, tensors)
  expected = param_io.flat_names(network.abstract_params(config))
  params, used = {}, set()
  for name, leaf in expected.items():
    hf_name, transpose = _hf_name(name)
    if hf_name not in tensors:
      raise ValueError(f"{src}: tensor {hf_name} (for parameter {name}) is missing")
    value = np.asarray(tensors[hf_name], np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(leaf.shape):
      raise ValueError(
          f"{src}: parameter {name} (from {hf_name}) has shape "
          f"{value.shape}, config.json implies {tuple(leaf.shape)}"
      )
    params[name], _ = value, used.add(hf_name)
  extra = sorted(set(tensors) - used - _HF_ALIASES)
  if extra:
    raise ValueError(
        f"{src}: tensor {extra[0]} has no place in the network " f"({len(extra)} unexpected)"
    )
  return param_io.unflat_names(params)


def _is_ts_spec(value) -> bool:
  return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _read_t5x_leaf(value, ckpt_dir: str, name: str):
  if not _is_ts_spec(value):
    return np.asarray(value, np.float32)
  spec = json.loads(json.dumps(value, default=lambda b: b.decode()))
  kvstore = spec["kvstore"]
  if kvstore.get("driver") == "gcs" or ckpt_dir.startswith("gs://"):
    # T5X writes a placeholder bucket; the real one is the checkpoint's.
    m = re.fullmatch(r"gs://([^/]+)/(.*)", ckpt_dir)
    if not m:
      raise ValueError(f"{name}: gcs tensorstore spec but {ckpt_dir} is not gs://")
    kvstore.update(driver="gcs", bucket=m.group(1), path=os.path.join(m.group(2), kvstore["path"]))
  else:
    kvstore.update(driver="file", path=os.path.join(ckpt_dir, kvstore["path"]))
  try:
    return ts.open(spec, open=True, read=True).result().read().result().astype(np.float32)
  except ValueError as e:
    raise ValueError(
        f"{ckpt_dir}: tensorstore array for parameter {name} " f"could not be read: {e}"
    ) from e


def from_t5x(src: str, config: T5Config):
  path = os.path.join(src, "checkpoint")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: not found (a T5X checkpoint_N directory " "holds the msgpack file `checkpoint`)"
    )
  with open(path, "rb") as f:
    contents = flax.serialization.msgpack_restore(f.read())
  state = contents["optimizer"] if contents.get("version", 0) else contents
  if "target" not in state:
    raise ValueError(f"{path}: no optimizer/target parameter tree")
  flat = flax.traverse_util.flatten_dict(state["target"], is_leaf=lambda _, v: _is_ts_spec(v))
  stored = {"/".join(k): v for k, v in flat.items()}
  expected = param_io.flat_names(network.abstract_params(config))
  params = {}
  for name, leaf in expected.items():
    if name not in stored:
      raise ValueError(f"{path}: parameter {name} is missing")
    value = _read_t5x_leaf(stored[name], src, name)
    if value.shape != tuple(leaf.shape):
      raise ValueError(
          f"{path}: parameter {name} has shape {value.shape}, the "
          f"gin config implies {tuple(leaf.shape)}"
      )
    params[name] = value
  extra = sorted(set(stored) - set(expected))
  if extra:
    raise ValueError(
        f"{path}: parameter {extra[0]} has no place in the network " f"({len(extra)} unexpected)"
    )
  return param_io.unflat_names(params)


def config_gin(config: T5Config) -> str:
  lines = [f"T5Config.{f} = {getattr(config, f)!r}" for f in _HF_CONFIG_FIELDS]
  return (
      "# T5Config of a converted checkpoint (lumenvq.convert_checkpoint).\n"
      + "\n".join(lines)
      + "\n"
  )


def convert(source: str, src: str, dst: str, t5x_config: T5Config = None) -> T5Config:
  """Converts and writes DST; `t5x_config` gives the dimensions of a T5X checkpoint."""
  if source == "hf":
    config = hf_config(src)
    params = from_hf(src, config)
  elif source == "t5x":
    if t5x_config is None:
      raise ValueError(
          "--from t5x needs the model's dimensions: pass --gin_file "
          "gin_configs/models/<size>.gin (T5X checkpoints carry no config)"
      )
    config = t5x_config
    params = from_t5x(src, config)
  else:
    raise ValueError(f"--from {source!r}: expected 'hf' or 't5x'")
  params_dir = os.path.join(dst, "params")
  if os.path.exists(params_dir):
    raise FileExistsError(f"{params_dir} already exists; remove it or pick another --to")
  os.makedirs(dst, exist_ok=True)
  param_io.save_params(params_dir, params)
  tmp = os.path.join(dst, "model.gin.tmp")
  with open(tmp, "w") as f:
    f.write(config_gin(config))
  os.replace(tmp, os.path.join(dst, "model.gin"))
  return config
