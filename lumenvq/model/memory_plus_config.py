"""MemoryPlusConfig: which T5 layers get a memory+ block (Memory Layers at Scale) and its sizes.

Named "memory+" throughout, never "memory layers": in this project those are LUMEN's
memory-encoder layers. `T5Config.memory_plus = None` (the default) leaves the network as it
was; `gin_configs/architectures/memory_plus.gin` turns it on.
"""

import dataclasses
from typing import Optional

import gin

VALUE_STORAGES = ("float", "pq_train", "pq_codes")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemoryPlusConfig:
  """Defaults are the reference's (facebookresearch/memory, HashingMemory): 4 heads, knn 32,
  n_keys 1024 (N = n_keys^2 = 1M values), key_dim 512, value_dim = emb_dim, one value pool
  shared by every memory+ layer.

  encoder_layers / decoder_layers: indices of the layers whose MLP gets the memory+ block.
  replace_mlp: the block replaces the MLP (the reference), else it is added beside it.
  value_storage: "float" (a trainable [N, value_dim] table); "pq_train" (the float table seen
    through the project's product quantizer, straight-through, EMA codebooks: MEMORY-VQ's
    recipe, started from a trained float memory); "pq_codes" (only the integer codes and
    codebooks, `memory_plus.export_pq_values`; the selected rows are decoded per query).
  pq_subspaces / pq_codebook_size: G and C of the value quantizer.
  """

  encoder_layers: tuple = ()
  decoder_layers: tuple = ()
  n_keys: int = 1024
  heads: int = 4
  knn: int = 32
  key_dim: int = 512
  value_dim: Optional[int] = None
  query_norm: bool = False
  shared_values: bool = True
  replace_mlp: bool = True
  value_storage: str = "float"
  pq_subspaces: int = 16
  pq_codebook_size: int = 256

  def __post_init__(self):
    for field in ("encoder_layers", "decoder_layers"):
      object.__setattr__(self, field, tuple(int(i) for i in getattr(self, field)))
    for field in ("n_keys", "heads", "knn", "key_dim", "pq_subspaces", "pq_codebook_size"):
      if getattr(self, field) <= 0:
        raise ValueError(f"MemoryPlusConfig.{field} must be positive, got {getattr(self, field)}")
    if self.key_dim % 2:
      raise ValueError(f"MemoryPlusConfig.key_dim={self.key_dim} must be even (two half-keys)")
    if self.knn > self.n_keys:
      raise ValueError(f"MemoryPlusConfig.knn={self.knn} must be <= n_keys={self.n_keys}")
    if self.value_storage not in VALUE_STORAGES:
      raise ValueError(
          f"MemoryPlusConfig.value_storage={self.value_storage!r}: one of {VALUE_STORAGES}"
      )

  @property
  def num_values(self) -> int:
    return self.n_keys * self.n_keys

  def layers(self, stack: str) -> tuple:
    return {"encoder": self.encoder_layers, "decoder": self.decoder_layers}[stack]

  def check_layers(self, num_encoder_layers: int, num_decoder_layers: int):
    """Rejects layer indices outside the stacks, naming the setting."""
    for stack, depth in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
      bad = [i for i in self.layers(stack) if not 0 <= i < depth]
      if bad:
        raise ValueError(
            f"MemoryPlusConfig.{stack}_layers={self.layers(stack)}: {bad} outside "
            f"[0, {depth}) (T5Config.num_{stack}_layers)"
        )
