"""T5Config: the network's hyper-parameters, bound from gin (`gin_configs/models/*.gin`)."""

import dataclasses
from typing import Any, Optional

import gin
import jax.numpy as jnp

from lumenvq.model.memory_plus_config import MemoryPlusConfig
from lumenvq.model.vq_attention import VQAttentionConfig

ATTENTION_KINDS = ("dense", "vq")


def as_dtype(name_or_dtype) -> Any:
  """gin passes dtypes as strings ('bfloat16'); accept those and jnp dtypes."""
  return jnp.dtype(name_or_dtype).type if isinstance(name_or_dtype, str) else name_or_dtype


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 1.1 dimensions. Defaults are T5 1.1 small; `dtype` is the activation dtype.

  `logits_via_embedding` ties the output layer to the token embedding (T5 1.0 and T5X's
  option of that name); T5 1.1 keeps a separate `logits_dense`. Tying makes copying input
  tokens easy, which is what a small reader trained from scratch must learn first.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: Any = "bfloat16"
  param_dtype: Any = "float32"
  logits_via_embedding: bool = False
  # Product-key memory+ blocks in chosen layers (memory_plus_config.py); None: none.
  memory_plus: Optional[MemoryPlusConfig] = None
  # 'vq': Transformer-VQ attention (vq_attention.py) in the encoder / decoder self-attention.
  encoder_attention: str = "dense"
  decoder_self_attention: str = "dense"
  vq_attention: VQAttentionConfig = dataclasses.field(default_factory=VQAttentionConfig)

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype))
    object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
    for field in (
        "vocab_size",
        "emb_dim",
        "num_heads",
        "head_dim",
        "mlp_dim",
        "relative_attention_num_buckets",
    ):
      if getattr(self, field) <= 0:
        raise ValueError(f"T5Config.{field} must be positive, got {getattr(self, field)}")
    if self.memory_plus is not None:
      self.memory_plus.check_layers(self.num_encoder_layers, self.num_decoder_layers)
    for field in ("encoder_attention", "decoder_self_attention"):
      if getattr(self, field) not in ATTENTION_KINDS:
        raise ValueError(
            f"T5Config.{field}={getattr(self, field)!r}: expected one of {ATTENTION_KINDS}"
        )
    if "vq" in (self.encoder_attention, self.decoder_self_attention):
      self.vq_attention.check(self.relative_attention_max_distance)
