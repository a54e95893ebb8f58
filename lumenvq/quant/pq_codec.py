"""Product-quantization codec: pure encode/decode shared by training, precompute and the reader.

Layouts (one convention for the whole project):

* vectors ``x``: ``[..., d]``, float.
* single-stage codebooks: ``[G, C, d/G]`` (subspace g owns the dims ``g*d/G:(g+1)*d/G``);
  codes ``[..., G]``.
* residual codebooks: ``[R, G, C, d/G]``, stage r quantizing what stages ``0..r-1`` left over;
  codes ``[..., R, G]`` (stage-major). Storage that wants a flat row can reshape to
  ``[..., R*G]`` and back; decode accepts only the ``[..., R, G]`` form so the stage count is
  never guessed.
* code dtype: ``uint8`` when ``C <= 256``, ``uint16`` when ``C <= 65536`` (the MEMORY-VQ
  setting, 16-bit codes); larger codebooks are rejected because the store has no wider layout.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from lumenvq.quant import pq_decode_cpu

MAX_CODEBOOK_SIZE = 65536
DEFAULT_CHUNK_SIZE = 4096


def code_dtype(codebook_size: int) -> np.dtype:
  """Smallest unsigned dtype that holds codes ``0..codebook_size-1`` (uint8 or uint16)."""
  if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
    raise ValueError(
        f"codebook_size={codebook_size}: must be in [1, {MAX_CODEBOOK_SIZE}] (codes are "
        "stored as uint8 or uint16)"
    )
  return np.dtype(np.uint8) if codebook_size <= 256 else np.dtype(np.uint16)


def _check_codebooks(codebooks) -> tuple[int, int, int, int | None]:
  """Returns (G, C, subspace_dim, R or None) and rejects malformed codebooks by name."""
  if codebooks.ndim == 3:
    g, c, s = codebooks.shape
    r = None
  elif codebooks.ndim == 4:
    r, g, c, s = codebooks.shape
  else:
    raise ValueError(
        f"codebooks shape {tuple(codebooks.shape)}: expected [G, C, d/G] or "
        "[R, G, C, d/G] (residual stages)"
    )
  if not jnp.issubdtype(codebooks.dtype, jnp.floating):
    raise ValueError(f"codebooks dtype {codebooks.dtype}: must be floating point")
  code_dtype(c)
  return g, c, s, r


def _is_concrete(a) -> bool:
  return isinstance(a, np.ndarray) or (
      isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
  )


def encode(x, codebooks, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """Nearest-code index per subspace (and per residual stage if codebooks are 4-D).

  Squared distances are scanned over the codebook axis ``chunk_size`` codes at a time with a
  running argmin, so ``C = 65536`` codes need ``[..., G, chunk_size]`` scores, not
  ``[..., G, C]``. Ties go to the lowest code index (``argmin`` inside a chunk, strict ``<``
  across chunks), so results are deterministic. Distances use HIGHEST matmul precision: on
  TPU/GPU the default bf16 passes would pick wrong codes.
  """
  g, c, s, r = _check_codebooks(codebooks)
  if x.shape[-1] != g * s:
    raise ValueError(
        f"x last dim {x.shape[-1]} != num_subspaces {g} * subspace_dim {s} of the codebooks "
        f"(d must be divisible by G and match the codebooks)"
    )
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
  if r is None:
    return _encode_stage(x, codebooks, chunk_size)
  codes = []
  residual = x.astype(jnp.float32)
  for stage in range(r):
    stage_codes = _encode_stage(residual, codebooks[stage], chunk_size)
    residual = residual - _decode_stage(stage_codes, codebooks[stage]).astype(jnp.float32)
    codes.append(stage_codes)
  return jnp.stack(codes, axis=-2)


def _encode_stage(x, codebooks, chunk_size: int) -> jax.Array:
  g, c, s = codebooks.shape
  lead = x.shape[:-1]
  xs = x.reshape(-1, g, s).astype(jnp.float32)
  cb = codebooks.astype(jnp.float32)
  chunk = min(chunk_size, c)
  num_chunks = -(-c // chunk)
  pad = num_chunks * chunk - c
  norms = jnp.sum(cb * cb, axis=-1)  # [G, C]
  if pad:
    cb = jnp.pad(cb, ((0, 0), (0, pad), (0, 0)))
    norms = jnp.pad(norms, ((0, 0), (0, pad)), constant_values=jnp.inf)  # never chosen
  # ||x||^2 is constant per (vector, subspace), so the argmin needs only ||c||^2 - 2 x.c.
  # Layout [G, n, chunk]: a batched matmul with the batch axis leading and a contiguous
  # reduction axis, which CPU XLA runs ~2x faster than [n, G, chunk].
  xs = xs.transpose(1, 0, 2)  # [G, n, s]
  cb = cb.reshape(g, num_chunks, chunk, s).transpose(1, 0, 2, 3)
  norms = norms.reshape(g, num_chunks, chunk).transpose(1, 0, 2)

  def chunk_scores(cb_chunk, norm_chunk):
    dots = jnp.einsum("gns,gks->gnk", xs, cb_chunk, precision=lax.Precision.HIGHEST)
    return norm_chunk[:, None] - 2.0 * dots

  if num_chunks == 1:
    best = jnp.argmin(chunk_scores(cb[0], norms[0]), axis=-1)
  else:

    def chunk_best(k, cb_chunk, norm_chunk):
      scores = chunk_scores(cb_chunk, norm_chunk)
      return jnp.min(scores, axis=-1), jnp.argmin(scores, axis=-1) + k * chunk

    def step(carry, inp):
      best_val, best_idx = carry
      val, idx = chunk_best(*inp)
      better = val < best_val  # strict: an earlier chunk keeps ties
      return (jnp.where(better, val, best_val), jnp.where(better, idx, best_idx)), None

    # Chunk 0 seeds the carry, so the carry has x's sharding type under shard_map.
    carry = chunk_best(0, cb[0], norms[0])
    carry, _ = lax.scan(step, carry, (jnp.arange(1, num_chunks), cb[1:], norms[1:]))
    best = carry[1]
  best = best.T  # [n, G]
  return best.astype(code_dtype(c)).reshape(*lead, g)


def decode(codes, codebooks) -> jax.Array:
  """Code vectors concatenated over subspaces (and summed over residual stages).

  Shapes are always checked; code values are checked when ``codes`` is concrete (inside
  jit they cannot be, and an out-of-range code decodes to NaNs).
  """
  g, c, s, r = _check_codebooks(codebooks)
  want = (g,) if r is None else (r, g)
  if codes.ndim < len(want) or tuple(codes.shape[-len(want) :]) != want:
    layout = "[..., G]" if r is None else "[..., R, G]"
    raise ValueError(
        f"codes shape {tuple(codes.shape)} does not end in {want}: codebooks "
        f"{tuple(codebooks.shape)} expect codes {layout}"
    )
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes dtype {codes.dtype}: must be an integer type")
  if _is_concrete(codes) and codes.size:
    lo, hi = int(np.min(np.asarray(codes))), int(np.max(np.asarray(codes)))
    if lo < 0 or hi >= c:
      raise ValueError(f"codes range [{lo}, {hi}] does not fit codebook_size {c} of the codebooks")
  if r is None:
    return _decode_stage(codes, codebooks)
  out = _decode_stage(codes[..., 0, :], codebooks[0])
  for stage in range(1, r):
    out = out + _decode_stage(codes[..., stage, :], codebooks[stage])
  return out


def _decode_stage(codes, codebooks) -> jax.Array:
  g, _, s = codebooks.shape
  rows = codes.reshape(-1, g)
  return _decode_rows(rows, codebooks).reshape(*codes.shape[:-1], g * s)


@jax.custom_jvp
def _decode_rows(rows, codebooks) -> jax.Array:
  """[n, G*s] from codes [n, G]: on CPU the compiled kernel (pq_decode_cpu: FAISS's loop,
  1.1-1.3x FAISS's decode in benchmarks/pq_vs_faiss.py, where the XLA gather reached 0.5-0.7)
  when it is built, elsewhere the XLA gather."""
  if codebooks.dtype == jnp.float32 and pq_decode_cpu.available():
    if rows.dtype not in pq_decode_cpu.CODE_DTYPES:
      rows = rows.astype(jnp.int32)
    return lax.platform_dependent(
        rows, codebooks, cpu=pq_decode_cpu.decode_rows, default=_gather_rows
    )
  return _gather_rows(rows, codebooks)


@_decode_rows.defjvp
def _decode_rows_jvp(primals, tangents):
  """Decode is linear in the codebooks (the kernel has no derivative of its own)."""
  rows, codebooks = primals
  return _decode_rows(rows, codebooks), _gather_rows(rows, tangents[1])


def _gather_rows(rows, codebooks) -> jax.Array:
  # Two gathers, chosen by codebook size; both give the same values, and an out-of-range
  # code decodes to NaNs (a clamp would hide it). Measured on XLA:CPU against FAISS's decode
  # (20k vectors; benchmarks/pq_vs_faiss.py, benchmarks/memory_store.py): with C <= 256 the
  # codebooks fit in cache and one scalar gather per output element from the flattened
  # codebooks is 1.2-4x faster than row gathers; with 65,536 codes (8 MB at d = 512) the row
  # gathers are as fast on one device and 2.4x faster on two. Not measured on TPU/GPU.
  g, c, s = codebooks.shape
  rows = rows.astype(jnp.int32)
  if c <= 256:
    dim = jnp.arange(g * s, dtype=jnp.int32)
    subspace = dim // s
    code = rows[:, subspace]  # [n, d]: each output element's code.
    flat = (subspace * c + jnp.clip(code, 0, c - 1)) * s + dim % s
    out = jnp.asarray(codebooks).reshape(-1).at[flat].get(mode="promise_in_bounds")
    return jnp.where((code >= 0) & (code < c), out, jnp.nan)
  # One row gather per subspace from its own [C, s] codebook, concatenated.
  return jnp.concatenate(
      [jnp.take(codebooks[i], rows[:, i], axis=0, mode="fill") for i in range(g)], axis=-1
  )
