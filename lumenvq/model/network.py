"""T5 1.1 encoder-decoder in Flax Linen, with T5X's parameter names and logical axes.

Parameter tree (T5X's T5 1.1 network, so T5X and Hugging Face checkpoints import):
  token_embedder/embedding                              [vocab, embed]
  encoder/relpos_bias/rel_embedding                     [heads, relpos_buckets]
  encoder/layers_i/{pre_attention_layer_norm,pre_mlp_layer_norm}/scale
  encoder/layers_i/attention/{query,key,value}/kernel   [embed, joined_kv]
  encoder/layers_i/attention/out/kernel                 [joined_kv, embed]
  encoder/layers_i/mlp/{wi_0,wi_1}/kernel, mlp/wo/kernel
  encoder/encoder_norm/scale
  decoder/layers_i/{self_attention,encoder_decoder_attention,mlp}/...
  decoder/decoder_norm/scale, decoder/logits_dense/kernel [embed, vocab]
                        (absent with logits_via_embedding: T5 1.0 ties it to the embedding)

The encoder is a stack whose layers can run as two parts, `[0, n)` and `[n, L)`:
LUMEN runs the first part offline over passages (the memory encoder) and the
second per question over `[question ; memory]` (the live encoder).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumenvq.model import memory_plus, vq_attention
from lumenvq.model.network_config import T5Config

# T5X initialisers: truncated-normal-like variance scaling on fan-in.
_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_embed_init = nn.initializers.normal(stddev=1.0)


def _dense_kernel(module, name, shape, axes, config, scale=1.0):
  init = _kernel_init if scale == 1.0 else (lambda *a, **k: _kernel_init(*a, **k) * scale)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.param_dtype)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in fp32."""

  config: T5Config

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(
        jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.layer_norm_epsilon
    )
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x.shape[-1],),
        self.config.param_dtype,
    )
    return (y * scale.astype(jnp.float32)).astype(self.config.dtype)


class Dense(nn.Module):
  """A bias-free projection whose kernel carries logical axis names."""

  features: int
  axes: tuple
  config: T5Config
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    kernel = _dense_kernel(
        self, "kernel", (x.shape[-1], self.features), self.axes, self.config, self.init_scale
    )
    return jnp.dot(x.astype(self.config.dtype), kernel.astype(self.config.dtype))


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """Mesh-TF/T5 bucketing of `memory_pos - query_pos` (log-spaced far buckets)."""
  n = -relative_position
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  # maximum(n, 1) keeps log finite; those n are taken by the `is_small` branch.
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / np.log(max_distance / max_exact)
      * (num_buckets - max_exact)
  ).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(n < max_exact, n, large)


class RelativePositionBiases(nn.Module):
  """One learned scalar per (head, bucket), shared by all layers of a stack."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_positions, key_positions):
    """Bias [1 or batch, heads, q_len, k_len] for int positions [.., q] and [.., k]."""
    cfg = self.config
    rel = key_positions[..., None, :] - query_positions[..., :, None]
    buckets = relative_position_bucket(
        rel,
        self.bidirectional,
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
    )
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(_kernel_init, ("heads", "relpos_buckets")),
        (cfg.num_heads, cfg.relative_attention_num_buckets),
        cfg.param_dtype,
    )
    bias = jnp.take(table.astype(cfg.dtype), buckets, axis=1)  # [h, .., q, k]
    bias = jnp.moveaxis(bias, 0, -3)
    return bias if bias.ndim == 4 else bias[None]


class MultiHeadAttention(nn.Module):
  """Dot-product attention without 1/sqrt(d) scaling (folded into the query init).

  With `decode=True` it keeps a KV cache in the "cache" collection
  (cached_key, cached_value, cache_index) and attends one new position per call.
  """

  config: T5Config

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, bias, *, deterministic: bool, decode: bool = False):
    cfg = self.config
    inner = cfg.num_heads * cfg.head_dim
    proj = functools.partial(Dense, inner, ("embed", "joined_kv"), cfg)
    query = proj(name="query", init_scale=cfg.head_dim**-0.5)(inputs_q)
    key = proj(name="key")(inputs_kv)
    value = proj(name="value")(inputs_kv)
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.head_dim))
    query, key, value = split(query), split(key), split(value)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))
    if isinstance(bias, vq_attention.BlockBias):  # This stack's attention is 'vq'.
      out = vq_attention.VQAttention(cfg, name="vq")(
          query, key, value, bias, deterministic=deterministic, decode=decode
      )
      return Dense(cfg.emb_dim, ("joined_kv", "embed"), cfg, name="out")(
          out.reshape(out.shape[:2] + (inner,))
      )

    if decode:
      # The first (initialising) call sizes the cache from a full-length input;
      # later calls write one new key/value at cache_index. The caller's bias
      # already masks the unfilled positions.
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      if is_initialized:
        idx = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, idx, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, idx, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = idx + 1

    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    scores = scores + bias.astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    weights = nn.Dropout(cfg.dropout_rate, broadcast_dims=())(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    out = out.reshape(out.shape[:2] + (inner,))
    return Dense(cfg.emb_dim, ("joined_kv", "embed"), cfg, name="out")(out)


class MlpBlock(nn.Module):
  """Gated-GELU feed-forward: wo(gelu(wi_0 x) * wi_1 x)."""

  config: T5Config

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.config
    gate = nn.gelu(Dense(cfg.mlp_dim, ("embed", "mlp"), cfg, name="wi_0")(x), approximate=True)
    linear = Dense(cfg.mlp_dim, ("embed", "mlp"), cfg, name="wi_1")(x)
    h = nn.with_logical_constraint(gate * linear, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return Dense(cfg.emb_dim, ("mlp", "embed"), cfg, name="wo")(h)


def _feed_forward(layer, stack, h, deterministic):
  """The layer's MLP, or its memory+ block in the layers `T5Config.memory_plus` names."""
  cfg, plus = layer.config, layer.config.memory_plus
  if plus is None or layer.index not in plus.layers(stack):
    return MlpBlock(cfg, name="mlp")(h, deterministic=deterministic)
  y = memory_plus.MemoryPlusBlock(
      plus, cfg.emb_dim, cfg.dtype, cfg.param_dtype, layer.memory_values, name="memory_plus"
  )(h, deterministic=deterministic)
  return y if plus.replace_mlp else y + MlpBlock(cfg, name="mlp")(h, deterministic=deterministic)


def _residual(x, y, cfg, deterministic):
  y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
  return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
  config: T5Config
  index: int = 0
  memory_values: Optional[nn.Module] = None  # memory+'s shared value pool, if any

  @nn.compact
  def __call__(self, x, bias, *, deterministic: bool):
    cfg = self.config
    h = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
    x = _residual(
        x,
        MultiHeadAttention(cfg, name="attention")(h, h, bias, deterministic=deterministic),
        cfg,
        deterministic,
    )
    h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    return _residual(x, _feed_forward(self, "encoder", h, deterministic), cfg, deterministic)


class DecoderLayer(nn.Module):
  config: T5Config
  index: int = 0
  memory_values: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, *, deterministic: bool, decode: bool):
    cfg = self.config
    h = RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
    x = _residual(
        x,
        MultiHeadAttention(cfg, name="self_attention")(
            h, h, self_bias, deterministic=deterministic, decode=decode
        ),
        cfg,
        deterministic,
    )
    h = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
    x = _residual(
        x,
        MultiHeadAttention(cfg, name="encoder_decoder_attention")(
            h, encoded, cross_bias, deterministic=deterministic
        ),
        cfg,
        deterministic,
    )
    h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    return _residual(x, _feed_forward(self, "decoder", h, deterministic), cfg, deterministic)


def mask_bias(mask, dtype):
  """0 where attention is allowed, a large negative number where it is not."""
  return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min / 2).astype(dtype)


class Encoder(nn.Module):
  """Encoder stack; `run_layers` executes any contiguous range of its layers."""

  config: T5Config
  memory_values: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    self.relpos_bias = RelativePositionBiases(cfg, bidirectional=True)
    self.layers = [EncoderLayer(cfg, i, self.memory_values) for i in range(cfg.num_encoder_layers)]
    self.encoder_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))

  def __call__(self, x, mask, positions=None, *, deterministic: bool):
    x = self.run_layers(x, mask, 0, len(self.layers), positions, deterministic=deterministic)
    return self.finalize(x, deterministic=deterministic)

  def run_layers(self, x, mask, start, end, positions=None, *, deterministic: bool):
    """Layers [start, end) over embedded `x` [b, l, d] with key mask `mask` [b, l]."""
    if not 0 <= start <= end <= len(self.layers):
      raise ValueError(
          f"encoder layer range [{start}, {end}) is outside "
          f"[0, {len(self.layers)}) (num_encoder_layers)"
      )
    if self.config.encoder_attention == "vq":
      bias = vq_attention.block_bias(
          self.relpos_bias, positions, mask, self.config.vq_attention, bidirectional=True
      )
    else:
      if positions is None:
        positions = jnp.arange(x.shape[1])[None]
      bias = self.relpos_bias(positions, positions)
      bias = bias + mask_bias(mask[:, None, None, :], bias.dtype)
    for layer in self.layers[start:end]:
      x = layer(x, bias, deterministic=deterministic)
    return x

  def finalize(self, x, *, deterministic: bool):
    return self.dropout(self.encoder_norm(x), deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder stack. With `T5Config.logits_via_embedding` (T5 1.0) the output layer is the
  shared token embedding (passed in as `shared_embedding`), scaled by 1/sqrt(emb_dim)."""

  config: T5Config
  shared_embedding: Optional[nn.Module] = None
  memory_values: Optional[nn.Module] = None

  @nn.compact
  def __call__(
      self, y, encoded, encoder_mask, decoder_mask, *, deterministic: bool, decode: bool = False
  ):
    cfg = self.config
    relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
    vq = cfg.decoder_self_attention == "vq"
    if decode and self.has_variable("cache", "position") and vq:
      position = self.variable("cache", "position", lambda: None)
      self_bias = vq_attention.decode_bias(relpos, position.value, cfg.vq_attention)
      position.value = position.value + 1
    elif decode and self.has_variable("cache", "position"):
      # One incremental step: the query sits at `position`, keys span the cache.
      position = self.variable("cache", "position", lambda: None)
      key_positions = self.variable("cache", "key_positions", lambda: None).value[None]
      query_positions = position.value.reshape(1, 1)
      self_bias = relpos(query_positions, key_positions) + mask_bias(
          (key_positions <= position.value)[:, None, None, :], cfg.dtype
      )
      position.value = position.value + 1
    else:
      positions = jnp.arange(y.shape[1])[None]
      if decode:  # Initialising call: remember the cache length for later steps.
        self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
        self.variable("cache", "key_positions", lambda: positions[0])
      if vq:
        self_bias = vq_attention.block_bias(
            relpos, None, decoder_mask, cfg.vq_attention, bidirectional=False
        )
      else:
        causal = positions[:, :, None] >= positions[:, None, :]
        self_bias = relpos(positions, positions) + mask_bias(
            (causal & decoder_mask[:, None, :])[:, None], cfg.dtype
        )
    cross_bias = mask_bias(encoder_mask[:, None, None, :], cfg.dtype)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, i, self.memory_values, name=f"layers_{i}")(
          y, encoded, self_bias, cross_bias, deterministic=deterministic, decode=decode
      )
    y = RMSNorm(cfg, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1]).astype(cfg.dtype)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="logits_dense")(y)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """T5 1.1 encoder-decoder; tokens use id 0 as padding (T5X convention).

  Besides `__call__` (teacher-forced logits), the pieces are exposed for the
  reader models: `embed`, `encoder.run_layers` / `encoder.finalize` through
  `encode_layers` / `encode_finalize`, and `decode` over any encoded sequence
  with an explicit encoder mask (FiD and LUMEN concatenate passages there).
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = nn.Embed(
        cfg.vocab_size,
        cfg.emb_dim,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(_embed_init, ("vocab", "embed")),
    )
    # memory+'s value pool shared by its layers (None without memory+ or with one per layer).
    self.memory_plus_values = memory_plus.shared_pool(cfg.memory_plus, cfg.emb_dim, cfg.param_dtype)
    self.encoder = Encoder(cfg, memory_values=self.memory_plus_values)
    self.decoder = Decoder(
        cfg, shared_embedding=self.token_embedder, memory_values=self.memory_plus_values
    )
    self.embed_dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))

  def embed(self, tokens, *, deterministic: bool):
    x = self.embed_dropout(self.token_embedder(tokens), deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def encode_layers(self, x, mask, start, end, positions=None, *, deterministic: bool):
    return self.encoder.run_layers(x, mask, start, end, positions, deterministic=deterministic)

  def encode_finalize(self, x, *, deterministic: bool):
    return self.encoder.finalize(x, deterministic=deterministic)

  def encode(self, encoder_input_tokens, *, deterministic: bool = True):
    mask = encoder_input_tokens > 0
    x = self.embed(encoder_input_tokens, deterministic=deterministic)
    return self.encoder(x, mask, deterministic=deterministic)

  def decode(
      self,
      encoded,
      encoder_mask,
      decoder_input_tokens,
      decoder_target_tokens=None,
      *,
      deterministic: bool = True,
      decode: bool = False,
  ):
    """Logits [b, l, vocab]. In `decode` mode one position per call over the cache."""
    if decoder_target_tokens is None:
      decoder_target_tokens = jnp.ones_like(decoder_input_tokens)
    y = self.embed(decoder_input_tokens, deterministic=deterministic)
    return self.decoder(
        y,
        encoded,
        encoder_mask,
        decoder_target_tokens > 0,
        deterministic=deterministic,
        decode=decode,
    )

  def __call__(
      self,
      encoder_input_tokens,
      decoder_input_tokens,
      decoder_target_tokens,
      *,
      enable_dropout: bool = False,
  ):
    deterministic = not enable_dropout
    encoded = self.encode(encoder_input_tokens, deterministic=deterministic)
    return self.decode(
        encoded,
        encoder_input_tokens > 0,
        decoder_input_tokens,
        decoder_target_tokens,
        deterministic=deterministic,
    )


def init_variables(
    config: T5Config, rng, batch_size: int = 1, encoder_length: int = 8, decoder_length: int = 8
):
  """Initial variables (boxed with logical axis metadata); shapes only depend on config."""
  enc = jnp.ones((batch_size, encoder_length), jnp.int32)
  dec = jnp.ones((batch_size, decoder_length), jnp.int32)
  return Transformer(config).init(rng, enc, dec, dec)


def abstract_params(config: T5Config):
  """ShapeDtypeStructs of the parameters (with logical metadata), without allocating."""
  return jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0)))["params"]
