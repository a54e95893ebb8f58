"""FiD, LUMEN, LUMEN-VQ and LUMEN-Light readers: Flax modules around the T5 1.1 network.

Every reader subclasses `network.Transformer`, so its "params" tree is exactly plain T5's
(`token_embedder/...`, `encoder/layers_i/...`, `decoder/...`): a converted T5 1.1
checkpoint restores into any of them, and `decoding` runs on them through
`Transformer.decode`. LUMEN-VQ's codebooks live in the "quantizer" collection.

Inputs use 0 as padding: question_tokens [B, Lq] (left-aligned), passage_tokens
[B, K, Lp]. An all-padding passage (retrieved id -1) is absent: the decoder sees neither
its memory nor its copy of the question. The encoder splits at n = memory layers:

  memory   = layers [0, n)(embed(passage))         per passage alone   [B, K, Lm, d]
  question = layers [0, n)(embed(question))        once per question   [B, Lq, d]
  live_k   = norm(layers [n, L)([question ; memory_k]))                 [B, K, Lq + Lm, d]
  decoder  cross-attends to all live_k concatenated                    [B, K * (Lq + Lm), d]

Positions in the live encoder continue the passage after the question's last real token,
so n = 0 (FiD) equals plain T5 on the unpadded concatenation `question ; passage`.
"""

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lumenvq.model import network, token_pruning
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.quant import pq_codec, quantizer

MEMORY_AXES = ("batch", "passages", "length", "embed")
CODE_AXES = ("batch", "passages", "length", "subspace")


def _constrain(x, axes):
  """Logical constraint for [B, K, L, last] arrays, or [N, L, last] ones (offline passages);
  the trailing dims of `axes` name the last ones."""
  if x.ndim == len(axes):
    return nn.with_logical_constraint(x, axes)
  if x.ndim == len(axes) - 1:
    return nn.with_logical_constraint(x, axes[:1] + axes[2:])
  return x


@flax.struct.dataclass
class Memory:
  """What the memory encoder hands the live encoder (and the store keeps).

  vectors [..., Lm, d] float, mask [..., Lm] bool; codes [..., Lm, G] (or [..., Lm, R, G])
  uint8/uint16 for LUMEN-VQ when asked for, else None; positions [..., Lm] int32, each kept
  token's position in its passage, for pruned memory (None: token i is at position i).
  """

  vectors: jax.Array
  mask: jax.Array
  codes: Optional[jax.Array] = None
  positions: Optional[jax.Array] = None


class Reader(network.Transformer):
  """FiD and LUMEN (FiD is the n = 0 split: no memory encoder, everything live).

  `reader` carries the architecture; use `make_reader` so the class matches it.
  """

  reader: ReaderConfig

  def setup(self):
    super().setup()
    want = READERS[self.reader.architecture]
    if type(self) is not want:
      raise ValueError(
          f"ReaderConfig.architecture={self.reader.architecture!r} is built by "
          f"readers.{want.__name__}, not {type(self).__name__} (use make_reader)"
      )
    self.num_memory_layers = self.reader.num_memory_layers(self.config.num_encoder_layers)
    if self.reader.token_pruning is not None:
      self.token_importance = token_pruning.TokenImportance(
          self.reader.token_pruning, self.reader.passage_length, self.config.vocab_size
      )

  def frozen_param_patterns(self) -> tuple:
    """Regexes for the trainer's `frozen_patterns` (encoder layers [0, n) when
    `ReaderConfig.freeze_memory_encoder`); works on an unbound module."""
    return self.reader.frozen_param_patterns(self.config.num_encoder_layers)

  def _shared_prefix(self, tokens, deterministic):
    """Embedding + layers [0, n): the memory encoder, also run over the question."""
    x = self.embed(tokens, deterministic=deterministic)
    return self.encode_layers(x, tokens > 0, 0, self.num_memory_layers, deterministic=deterministic)

  def compute_memory(
      self, passage_tokens, *, enable_dropout: bool = False, return_codes: bool = False
  ) -> Memory:
    """Memory of passages [..., Lp] (any leading dims: [B, K] in training, [N] offline)."""
    lp = self.reader.passage_length
    if passage_tokens.ndim < 2 or passage_tokens.shape[-1] != lp:
      raise ValueError(
          f"passage_tokens shape {tuple(passage_tokens.shape)}: expected "
          f"[..., ReaderConfig.passage_length={lp}]"
      )
    lead = passage_tokens.shape[:-1]
    tokens = passage_tokens.reshape(-1, lp)
    x = self._shared_prefix(tokens, not enable_dropout)
    vectors = _constrain(x.reshape(*lead, lp, x.shape[-1]), MEMORY_AXES)
    memory = self.store(Memory(vectors, passage_tokens > 0), return_codes=return_codes)
    if self.reader.token_pruning is None:
      return memory
    # After quantizing: VQ-LM's score reads the quantized vectors.
    kept = self.token_importance(vectors, memory.vectors, passage_tokens, memory.mask)
    codes = None if memory.codes is None else token_pruning.take(memory.codes, kept.index)
    return Memory(token_pruning.apply(memory.vectors, kept), kept.mask, codes, kept.index)

  def store(self, memory: Memory, *, return_codes: bool = False) -> Memory:
    """What is kept of the memory encoder's output; the VQ and Light readers override it."""
    if return_codes:
      raise ValueError(
          f"return_codes=True: ReaderConfig.architecture="
          f"{self.reader.architecture!r} stores float memory; codes exist for "
          "lumen_vq"
      )
    return memory

  def encode_memory(self, question_tokens, memory: Memory, *, enable_dropout: bool = False):
    """Live encoder over `[question ; memory_k]`; returns (encoded [B, K*(Lq+Lm), d], mask)."""
    cfg, deterministic = self.config, not enable_dropout
    if memory.vectors.ndim != 4 or memory.vectors.shape[2:] != (
        self.reader.memory_length,
        cfg.emb_dim,
    ):
      raise ValueError(
          f"memory shape {tuple(memory.vectors.shape)}: expected [B, K, "
          f"{self.reader.memory_length} (memory length), {cfg.emb_dim} (emb_dim)]"
      )
    if memory.mask.shape != memory.vectors.shape[:3]:
      raise ValueError(
          f"memory mask shape {tuple(memory.mask.shape)} != memory "
          f"{tuple(memory.vectors.shape[:3])}"
      )
    b, k, lm, d = memory.vectors.shape
    lq = question_tokens.shape[1]
    question_mask = question_tokens > 0
    question = self._shared_prefix(question_tokens, deterministic)  # Once, not K times.
    x = jnp.concatenate(
        [jnp.broadcast_to(question[:, None], (b, k, lq, d)), memory.vectors.astype(cfg.dtype)],
        axis=2,
    )
    x = nn.with_logical_constraint(x, MEMORY_AXES)
    memory_mask = memory.mask.astype(jnp.bool_)
    # An absent passage hides its copy of the question too, so the decoder reads the
    # same keys as with that passage left out.
    present = jnp.any(memory_mask, axis=-1, keepdims=True)
    mask = jnp.concatenate([question_mask[:, None] & present, memory_mask], axis=2)
    # The passage continues right after the question's last real token, as in the
    # unpadded text `question passage`: question padding does not shift distances. Pruned
    # memory keeps its tokens' positions in the passage.
    question_length = jnp.sum(question_mask, axis=-1, keepdims=True)
    passage_positions = (
        jnp.arange(lm) if memory.positions is None else memory.positions.astype(jnp.int32)
    )
    positions = jnp.concatenate(
        [
            jnp.broadcast_to(jnp.arange(lq)[None, None], (b, k, lq)),
            jnp.broadcast_to(question_length[:, :, None] + passage_positions, (b, k, lm)),
        ],
        axis=2,
    ).reshape(b * k, -1)
    x = self.encode_layers(
        x.reshape(b * k, lq + lm, d),
        mask.reshape(b * k, -1),
        self.num_memory_layers,
        cfg.num_encoder_layers,
        positions,
        deterministic=deterministic,
    )
    x = self.encode_finalize(x, deterministic=deterministic)
    encoded = nn.with_logical_constraint(
        x.reshape(b, k * (lq + lm), d), ("batch", "length", "embed")
    )
    return encoded, mask.reshape(b, k * (lq + lm))

  def encode_passages(self, question_tokens, passage_tokens, *, enable_dropout: bool = False):
    """End-to-end encoder: memory computed on the fly; (encoded, mask) for the decoder."""
    memory = self.compute_memory(passage_tokens, enable_dropout=enable_dropout)
    return self.encode_memory(question_tokens, memory, enable_dropout=enable_dropout)

  def from_memory(
      self,
      question_tokens,
      memory: Memory,
      decoder_input_tokens,
      decoder_target_tokens=None,
      *,
      enable_dropout: bool = False,
  ):
    """Teacher-forced logits [B, T, vocab] from precomputed (or code-decoded) memory."""
    encoded, mask = self.encode_memory(question_tokens, memory, enable_dropout=enable_dropout)
    return self.decode(
        encoded, mask, decoder_input_tokens, decoder_target_tokens, deterministic=not enable_dropout
    )

  def __call__(
      self,
      question_tokens,
      passage_tokens,
      decoder_input_tokens,
      decoder_target_tokens=None,
      *,
      enable_dropout: bool = False,
  ):
    """Teacher-forced logits [B, T, vocab] from question [B, Lq] and passages [B, K, Lp]."""
    memory = self.compute_memory(passage_tokens, enable_dropout=enable_dropout)
    return self.from_memory(
        question_tokens,
        memory,
        decoder_input_tokens,
        decoder_target_tokens,
        enable_dropout=enable_dropout,
    )


class LumenVQ(Reader):
  """LUMEN with product-quantized memory (MEMORY-VQ).

  The quantizer updates its EMA codebooks exactly when the "quantizer" collection is
  mutable (train steps: `mutable=["quantizer"]` and a "quantizer" PRNG stream); eval and
  predict must leave it immutable. Its metrics are sown to "intermediates" as
  `quantizer_metrics`. The straight-through output lets gradients reach the memory encoder.
  """

  def setup(self):
    super().setup()
    r = self.reader
    self.quantizer = quantizer.ProductQuantizer(
        num_subspaces=r.subspaces(self.config.emb_dim),
        codebook_size=r.codebook_size,
        num_residual=r.num_residual,
        ema_decay=r.ema_decay,
        dead_code_threshold=r.dead_code_threshold,
        dtype=self.config.dtype,
    )

  def codebooks(self):
    """[G, C, s] (or [R, G, C, s]) codebooks, as `pq_codec` and the code store take them."""
    return quantizer.export_codebooks(self.quantizer.variables)

  def store(self, memory: Memory, *, return_codes: bool = False) -> Memory:
    update = (
        self.is_mutable_collection(quantizer.QUANTIZER_COLLECTION) and not self.is_initializing()
    )
    vectors, metrics = self.quantizer(memory.vectors, train=update, mask=memory.mask)
    self.sow("intermediates", "quantizer_metrics", metrics)
    codes = None
    if return_codes:
      if update:
        raise ValueError(
            "return_codes=True with the 'quantizer' collection mutable: a "
            "train step moves the codebooks after quantizing; compute codes "
            "in eval (immutable)"
        )
      codes = pq_codec.encode(
          memory.vectors, self.codebooks(), chunk_size=self.quantizer.chunk_size
      )
      if self.reader.num_residual == 1:  # [..., R, G] codes have one more axis.
        codes = _constrain(codes, CODE_AXES)
    return Memory(vectors, memory.mask, codes)

  def memory_from_codes(self, codes, mask, codebooks=None) -> Memory:
    """Dequantized memory from stored codes [B, K, Lm, G] ([..., R, G] for R residual
    stages; a pruned reader's rows `code_rows` wrote: [..., Lm, 1 + R*G]) and their mask
    [B, K, Lm].

    `codebooks` default to this module's own; the reader passes the ones stored with codes.
    """
    codebooks = self.codebooks() if codebooks is None else codebooks
    positions = None
    if self.reader.stores_positions:
      r, g = self.reader.num_residual, self.reader.subspaces(self.config.emb_dim)
      if codes.shape[-1] != 1 + r * g:
        raise ValueError(
            f"stored rows of width {codes.shape[-1]}: ReaderConfig.token_pruning needs rows of "
            f"1 + R*G = {1 + r * g} (the position, then the codes)"
        )
      positions = codes[..., 0].astype(jnp.int32)
      codes = codes[..., 1:]
      if r > 1:
        codes = codes.reshape(*codes.shape[:-1], r, g)
    vectors = pq_codec.decode(codes, codebooks).astype(self.config.dtype)
    return Memory(_constrain(vectors, MEMORY_AXES), mask, codes, positions)


class LumenLight(Reader):
  """Baseline at LUMEN-VQ-like storage: keeps the memory of the first M tokens of each
  passage (the memory encoder still sees the whole passage); the rest is dropped."""

  def store(self, memory: Memory, *, return_codes: bool = False) -> Memory:
    m = self.reader.light_length
    return super().store(
        Memory(memory.vectors[..., :m, :], memory.mask[..., :m]), return_codes=return_codes
    )


def code_rows(memory: Memory, width: int):
  """What a LUMEN-VQ store keeps per token, [..., Lm, width]: the R*G codes, after the
  token's position when the memory is pruned (`LumenVQ.memory_from_codes` reads it back)."""
  codes = memory.codes.reshape(*memory.codes.shape[: memory.mask.ndim], -1)
  if memory.positions is not None:
    codes = jnp.concatenate([memory.positions[..., None].astype(codes.dtype), codes], axis=-1)
  if codes.shape[-1] != width:
    raise ValueError(f"code rows of width {codes.shape[-1]}, the store expects {width}")
  return codes


READERS = {"fid": Reader, "lumen": Reader, "lumen_vq": LumenVQ, "lumen_light": LumenLight}


def make_reader(config: T5Config, reader: ReaderConfig) -> Reader:
  """The module class for `reader.architecture`."""
  return READERS[reader.architecture](config, reader=reader)


def init_variables(
    module: Reader, rng, batch_size: int = 1, question_length: int = 8, decoder_length: int = 8
):
  """Initial variables ("params", and "quantizer" for LUMEN-VQ) with logical axis metadata."""
  r = module.reader
  question = jnp.ones((batch_size, question_length), jnp.int32)
  passages = jnp.ones((batch_size, r.num_passages, r.passage_length), jnp.int32)
  decoder = jnp.ones((batch_size, decoder_length), jnp.int32)
  return module.init(rng, question, passages, decoder, decoder)


def export_codebooks(variables):
  """Codebooks for `pq_codec` / the code store from a LUMEN-VQ reader's variables."""
  return quantizer.export_codebooks(
      {quantizer.QUANTIZER_COLLECTION: variables[quantizer.QUANTIZER_COLLECTION]["quantizer"]}
  )
