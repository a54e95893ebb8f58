"""ReaderConfig: the memory-reader hyper-parameters, bound from gin (`gin_configs/architectures/`).

The network's own dimensions stay in `T5Config`; this holds what the readers add: which
architecture, how many passages of what length, the live fraction alpha that splits the
encoder, the product quantizer's shape, and LUMEN-Light's kept memory length. Everything
here is plain Python so the trainer, the feature converter and the precompute job can ask
for derived numbers (memory layers, freeze regex, bytes per token) without a module.
"""

import dataclasses
import math
from typing import Optional

import gin
import numpy as np

from lumenvq.model.network_config import T5Config
from lumenvq.model.token_pruning import TokenPruning
from lumenvq.quant import pq_codec

ARCHITECTURES = ("fid", "lumen", "lumen_vq", "lumen_light")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReaderConfig:
  """Reader settings. Defaults are LUMEN's: alpha = 1/3 of the encoder layers live.

  Attributes:
    architecture: one of ARCHITECTURES; `readers.make_reader` picks the module class by it.
    num_passages: K retrieved passages per question.
    passage_length: Lp tokens per passage (padded with 0).
    live_fraction: alpha; the memory encoder is the first round((1 - alpha) * L) encoder
      layers (half rounds up), the live encoder the rest. Ignored by fid (everything live).
    num_subspaces: G product-quantization subspaces; None takes d / subspace_dim, so one
      architecture file composes with every model size.
    subspace_dim: dims per subspace when num_subspaces is None (MEMORY-VQ: 16).
    codebook_size: C codes per subspace (65536: 16-bit codes, as published).
    num_residual: residual quantization stages R (1 in MEMORY-VQ).
    ema_decay, dead_code_threshold: the quantizer's EMA decay and dead-code reset level.
    light_length: M memory tokens kept per passage by lumen_light.
    freeze_memory_encoder: the trainer freezes `memory_encoder_param_regex` when set.
    token_pruning: variable-rate memory (`token_pruning.TokenPruning`): each passage keeps
      its most important tokens, with their positions. None keeps every token.
  """

  architecture: str = "lumen"
  num_passages: int = 20
  passage_length: int = 256
  live_fraction: float = 1.0 / 3.0
  num_subspaces: Optional[int] = None
  subspace_dim: int = 16
  codebook_size: int = 65536
  num_residual: int = 1
  ema_decay: float = 0.999
  dead_code_threshold: float = 0.01
  light_length: Optional[int] = None
  freeze_memory_encoder: bool = False
  token_pruning: Optional[TokenPruning] = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
          f"ReaderConfig.architecture={self.architecture!r}: expected one of " f"{ARCHITECTURES}"
      )
    for field in ("num_passages", "passage_length", "subspace_dim", "num_residual"):
      if getattr(self, field) < 1:
        raise ValueError(f"ReaderConfig.{field}={getattr(self, field)}: must be >= 1")
    if not 0.0 <= self.live_fraction <= 1.0:
      raise ValueError(f"ReaderConfig.live_fraction={self.live_fraction}: must be in [0, 1]")
    if self.architecture == "lumen_vq":
      pq_codec.code_dtype(self.codebook_size)  # Names codebook_size when out of range.
    if self.architecture == "lumen_light":
      m, lp = self.light_length, self.passage_length
      if m is None or not 1 <= m <= lp:
        raise ValueError(
            f"ReaderConfig.light_length={m}: lumen_light needs 1 <= M <= " f"passage_length={lp}"
        )
    if self.token_pruning is not None and self.architecture not in ("lumen", "lumen_vq"):
      raise ValueError(
          f"ReaderConfig.token_pruning with architecture={self.architecture!r}: pruning "
          "chooses among stored memory tokens, which lumen and lumen_vq have (lumen_light "
          "is TokenPruning.method='first' already)"
      )
    if self.token_pruning is not None and self.architecture == "lumen_vq":
      highest = np.iinfo(pq_codec.code_dtype(self.codebook_size)).max
      if self.passage_length - 1 > highest:  # Positions are stored beside the codes.
        raise ValueError(
            f"ReaderConfig.passage_length={self.passage_length} with token_pruning: a stored "
            f"token's position is kept in the code dtype of codebook_size="
            f"{self.codebook_size}, which holds positions up to {highest}"
        )
    if self.architecture == "fid" and self.freeze_memory_encoder:
      raise ValueError(
          "ReaderConfig.freeze_memory_encoder=True with architecture='fid': "
          "fid has no memory encoder to freeze"
      )

  def num_memory_layers(self, num_encoder_layers: int) -> int:
    """n: encoder layers [0, n) are the memory encoder; at least one layer stays live."""
    if self.architecture == "fid":
      return 0
    n = int(math.floor((1.0 - self.live_fraction) * num_encoder_layers + 0.5))
    if n >= num_encoder_layers:
      raise ValueError(
          f"ReaderConfig.live_fraction={self.live_fraction} leaves no live encoder layer of "
          f"num_encoder_layers={num_encoder_layers} (memory encoder would be {n} layers)"
      )
    return n

  @property
  def memory_length(self) -> int:
    """Memory vectors kept per passage: M for lumen_light and pruned readers, else
    passage_length."""
    if self.token_pruning is not None:
      return self.token_pruning.kept_length(self.passage_length)
    return self.light_length if self.architecture == "lumen_light" else self.passage_length

  @property
  def stores_positions(self) -> bool:
    """A pruned reader's stored tokens carry their positions in the passage."""
    return self.token_pruning is not None

  def subspaces(self, emb_dim: int) -> int:
    """G for model dimension d, checked to divide it."""
    g = self.num_subspaces if self.num_subspaces is not None else emb_dim // self.subspace_dim
    if g < 1 or emb_dim % g:
      setting = (
          f"ReaderConfig.num_subspaces={self.num_subspaces}"
          if self.num_subspaces is not None
          else f"ReaderConfig.subspace_dim={self.subspace_dim}"
      )
      raise ValueError(
          f"{setting}: model dimension T5Config.emb_dim={emb_dim} is not "
          f"divisible into {g} subspaces"
      )
    return g

  def memory_encoder_param_regex(self, num_encoder_layers: int) -> str:
    """Regex over '/'-joined parameter names matching the memory encoder's layers [0, n).

    Only those layers: `token_embedder` (shared with the question, the live encoder's input
    and the decoder) and `encoder/relpos_bias` (one table for all encoder layers) stay
    trainable. The question runs through the same layers, so it is frozen with them.
    """
    n = self.num_memory_layers(num_encoder_layers)
    if n == 0:
      raise ValueError(
          f"ReaderConfig.live_fraction={self.live_fraction}: no memory encoder "
          f"layer of num_encoder_layers={num_encoder_layers} to freeze"
      )
    return r"^encoder/layers_(" + "|".join(str(i) for i in range(n)) + r")/"

  def frozen_param_patterns(self, num_encoder_layers: int) -> tuple:
    """What the trainer's `frozen_patterns` should add for this reader."""
    if not self.freeze_memory_encoder:
      return ()
    return (self.memory_encoder_param_regex(num_encoder_layers),)

  def stored_width(self, emb_dim: int) -> int:
    """Values per stored token: R*G codes (plus the position for pruned readers) for
    lumen_vq, d activations otherwise."""
    if self.architecture != "lumen_vq":
      return emb_dim
    return self.num_residual * self.subspaces(emb_dim) + int(self.stores_positions)

  def stored_tokens(self, real_tokens):
    """Memory tokens stored of passages with `real_tokens` real tokens (int or array): the
    pruned reader's kept share, LUMEN-Light's first M, else every real token."""
    n = np.asarray(real_tokens, np.int64)
    if self.token_pruning is not None:
      return self.token_pruning.kept_tokens(n)
    return np.minimum(n, self.memory_length)

  def memory_bytes_per_token(self, t5: T5Config, real_tokens=None) -> float:
    """Stored bytes per real memory token: what a stored token costs (codes for lumen_vq,
    positions included, d activations otherwise) x the stored share of the real tokens, over
    passages of `real_tokens` real tokens each (default: full passages, Lp). Padding is not
    memory: counted per real token, dropping it is no compression."""
    if self.architecture == "lumen_vq":
      itemsize = pq_codec.code_dtype(self.codebook_size).itemsize
    else:
      itemsize = np.dtype(t5.dtype).itemsize
    per_kept = self.stored_width(t5.emb_dim) * itemsize
    n = np.full(1, self.passage_length) if real_tokens is None else np.asarray(real_tokens)
    return per_kept * float(self.stored_tokens(n).sum()) / float(n.sum())

  def compression_ratio(self, t5: T5Config, real_tokens=None) -> float:
    """Uncompressed memory (d values in the activation dtype per real token) over what is
    stored (`memory_bytes_per_token`)."""
    return t5.emb_dim * np.dtype(t5.dtype).itemsize / self.memory_bytes_per_token(t5, real_tokens)
