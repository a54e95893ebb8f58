"""The memory+ block (Memory Layers at Scale, Berges et al. 2024) and its value pool.

  out = W_out( bag(values; product_keys(x)) * silu(W_gate x) )

The value pool is an [N, value_dim] table read only at the H x knn rows the product keys
select per token. It is one module shared by every memory+ layer (the reference's default) or
one per layer, and it stores its rows as floats, as floats seen through the project's product
quantizer (straight-through, EMA codebooks: MEMORY-VQ's training), or only as PQ codes, of
which just the selected rows are decoded (`export_pq_values` makes those from a trained table).

Parameters (shared pool at the root, per-layer pools inside each block):
  memory_plus_values/values                [N, value_dim]  (memory_plus_rows, memory_plus_value_dim)
  .../memory_plus/product_keys/{query/kernel, query/bias, keys}
  .../memory_plus/{gate,out}/{kernel,bias}
"""

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lumenvq.model.embedding_bag import embedding_bag
from lumenvq.model.memory_plus_config import MemoryPlusConfig
from lumenvq.model.product_keys import ProductKeys
from lumenvq.quant import pq_codec, quantizer

POOL_NAME = "memory_plus_values"
VALUE_AXES = ("memory_plus_rows", "memory_plus_value_dim")
# The "pq_codes" pool's variables: integer codes and their codebooks, not parameters.
CODES_COLLECTION = "memory_plus_codes"


class ValuePool(nn.Module):
  """The value table; `__call__(indices, weights)` is the weighted bag [..., value_dim]."""

  config: MemoryPlusConfig
  value_dim: int
  param_dtype: jnp.dtype = jnp.float32

  def _table(self):
    return self.param(
        "values",
        nn.with_logical_partitioning(nn.initializers.normal(self.value_dim**-0.5), VALUE_AXES),
        (self.config.num_values, self.value_dim),
        self.param_dtype,
    )

  @nn.compact
  def __call__(self, indices, weights, *, deterministic: bool):
    cfg = self.config
    if cfg.value_storage == "float":
      return embedding_bag(self._table(), indices, weights)
    g, c = cfg.pq_subspaces, cfg.pq_codebook_size
    if self.value_dim % g:
      raise ValueError(
          f"MemoryPlusConfig.pq_subspaces={g} does not divide the value dim {self.value_dim}"
      )
    if cfg.value_storage == "pq_train":
      rows = jnp.take(self._table(), indices, axis=0, mode="clip")  # [..., K, v]
      rows, _ = quantizer.ProductQuantizer(g, c, name="value_quantizer")(
          rows, train=not deterministic
      )
    else:  # pq_codes: decode only the selected rows.
      codes = self.variable(
          CODES_COLLECTION,
          "codes",
          nn.with_logical_partitioning(jnp.zeros, ("memory_plus_rows", "subspace")),
          (cfg.num_values, g),
          pq_codec.code_dtype(c),
      )
      codebooks = self.variable(
          CODES_COLLECTION,
          "codebooks",
          nn.with_logical_partitioning(jnp.zeros, quantizer.CODEBOOK_AXES[1:]),
          (g, c, self.value_dim // g),
          jnp.float32,
      )
      selected = jnp.take(codes.value, indices, axis=0, mode="clip")  # [..., K, G]
      rows = pq_codec.decode(selected, codebooks.value)
    return jnp.einsum(
        "...k,...kd->...d",
        weights.astype(jnp.float32),
        rows.astype(jnp.float32),
        preferred_element_type=jnp.float32,
    )


def _projection(features, axes, scale_dim, config_dtype, param_dtype, name):
  init = nn.initializers.normal(scale_dim**-0.5)
  return nn.Dense(
      features,
      dtype=config_dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      name=name,
  )


class MemoryPlusBlock(nn.Module):
  """In place of (or beside) a layer's MLP; `values` is the shared pool, or None for its own."""

  config: MemoryPlusConfig
  emb_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  values: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.config
    value_dim = cfg.value_dim or self.emb_dim
    indices, weights = ProductKeys(
        cfg.n_keys,
        cfg.heads,
        cfg.knn,
        cfg.key_dim,
        cfg.query_norm,
        self.dtype,
        self.param_dtype,
        name="product_keys",
    )(x)
    pool = self.values
    if pool is None:
      pool = ValuePool(cfg, value_dim, self.param_dtype, name=POOL_NAME)
    bag = pool(indices, weights, deterministic=deterministic)
    bag = nn.with_logical_constraint(bag.astype(self.dtype), ("batch", "length", "mlp"))
    gate = _projection(
        value_dim, ("embed", "mlp"), self.emb_dim, self.dtype, self.param_dtype, "gate"
    )(x)
    out = _projection(
        self.emb_dim, ("mlp", "embed"), value_dim, self.dtype, self.param_dtype, "out"
    )(bag * nn.silu(gate))
    return out


def shared_pool(config: MemoryPlusConfig, emb_dim: int, param_dtype) -> Optional[ValuePool]:
  """The pool every memory+ layer reads (None when memory+ is off or pools are per layer);
  create it in the owning module's setup as `POOL_NAME`."""
  if config is None or not config.shared_values:
    return None
  if not (config.encoder_layers or config.decoder_layers):
    return None
  return ValuePool(config, config.value_dim or emb_dim, param_dtype)


def export_pq_values(params, model_state):
  """(params, model_state) of a "pq_train" model, converted for value_storage="pq_codes":
  every pool's float table is encoded with its trained codebooks (the one N-sized pass, done
  offline) and dropped from the parameters; codes and codebooks go to `CODES_COLLECTION`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  qflat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(model_state.get(quantizer.QUANTIZER_COLLECTION, {}))
  )
  pools = [k[:-1] for k in flat if k[-2:] == (POOL_NAME, "values")]
  if not pools:
    raise ValueError(f"export_pq_values: no {POOL_NAME}/values parameter in params")
  codes_flat, new_q = {}, dict(qflat)
  for pool in pools:
    key = pool + ("value_quantizer", "codebooks")
    if key not in qflat:
      raise ValueError(
          f"export_pq_values: {'/'.join(pool)} has no trained codebooks ({'/'.join(key)}); "
          "train with MemoryPlusConfig.value_storage='pq_train' first"
      )
    codebooks = quantizer.export_codebooks(
        {quantizer.QUANTIZER_COLLECTION: {"codebooks": qflat[key]}}
    )
    table = nn.unbox(flat.pop(pool + ("values",)))
    codes_flat[pool + ("codes",)] = pq_codec.encode(table, codebooks)
    codes_flat[pool + ("codebooks",)] = jnp.asarray(codebooks, jnp.float32)
    for k in [k for k in new_q if k[: len(pool) + 1] == pool + ("value_quantizer",)]:
      del new_q[k]
  state = {k: v for k, v in model_state.items() if k != quantizer.QUANTIZER_COLLECTION}
  if new_q:
    state[quantizer.QUANTIZER_COLLECTION] = flax.traverse_util.unflatten_dict(new_q)
  state[CODES_COLLECTION] = flax.traverse_util.unflatten_dict(codes_flat)
  return flax.traverse_util.unflatten_dict(flat), state
