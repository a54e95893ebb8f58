"""The CPU kernel of product-quantization decode (csrc/pq_decode_cpu.cc) as a JAX op.

setup.py builds it as the optional extension `lumenvq.quant._pq_decode_cpu` (it needs a C++
compiler and jaxlib's XLA FFI headers at install time); without it `available()` is False and
`pq_codec` decodes with the XLA gather everywhere. The op runs on each device's own rows: it
is partitioned like its input's row axis, with the codebooks replicated, so a data-parallel
decode stays data-parallel (an FFI call is otherwise replicated, all-gathering the codes);
under vmap, batched codes are more rows and batched codebooks a call each.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from lumenvq import native

TARGET = "lumenvq_pq_decode"
CODE_DTYPES = (jnp.uint8, jnp.uint16, jnp.int32)  # What the kernel reads without a cast.


@functools.cache
def available() -> bool:
  """True once the built kernel is registered with XLA for the CPU platform."""
  built = native.library("quant._pq_decode_cpu", "PQ decode on CPU uses the slower XLA gather")
  if built is None:
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(built.LumenvqPqDecode), platform="cpu")
  return True


def threads_per_device(devices: int) -> int:
  """Cores for each CPU device's decode when the decode runs on `devices` devices at once:
  all of them on one device, one each with a device per core (the kernel's comment says
  why). Devices beyond this process's CPU devices are other hosts' cores."""
  here = min(max(devices, 1), jax.local_device_count("cpu"))
  return max(1, (os.cpu_count() or 1) // here)


def _kernel(rows, codebooks, devices: int):
  g, _, s = codebooks.shape
  out = jax.ShapeDtypeStruct((rows.shape[0], g * s), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(
      rows, codebooks, threads=np.int64(threads_per_device(devices))
  )


def _rows_sharding(mesh, rows_sharding) -> NamedSharding:
  spec = getattr(rows_sharding, "spec", None)
  return NamedSharding(mesh, P(spec[0] if spec else None, None))


def _partition(mesh, arg_shapes, result_shape):
  del result_shape
  rows = _rows_sharding(mesh, arg_shapes[0].sharding)
  lower = functools.partial(_kernel, devices=mesh.size)
  return mesh, lower, rows, (rows, NamedSharding(mesh, P()))


@custom_partitioning
def _partitioned(rows, codebooks):
  # Not partitioned: one device (its mesh empty), or each device of a shard_map's mesh.
  return _kernel(rows, codebooks, jax.sharding.get_abstract_mesh().size)


_partitioned.def_partition(
    partition=_partition,
    infer_sharding_from_operands=lambda mesh, args, result: _rows_sharding(mesh, args[0].sharding),
    sharding_rule="n g, g c s -> n d",
    need_replication_factors=("g", "c", "s", "d"),
)


@jax.custom_batching.custom_vmap
def decode_rows(rows, codebooks):
  """float32 [n, G*s] from codes `rows` [n, G] (CODE_DTYPES) and float32 codebooks
  [G, C, s]; NaN where a code is out of range. CPU only; no derivative (pq_codec adds it)."""
  out = _partitioned(rows, codebooks)
  # Under shard_map the result varies over the mesh axes its inputs vary over, as a gather's
  # would; the FFI call does not say so itself.
  varying = tuple(
      sorted(
          jax.typeof(rows).manual_axis_type.varying | jax.typeof(codebooks).manual_axis_type.varying
      )
  )
  return jax.lax.pcast(out, varying, to="varying") if varying else out


@decode_rows.def_vmap
def _decode_rows_vmap(axis_size, in_batched, rows, codebooks):
  """Batched rows are more rows; batched codebooks take a call each."""
  rows_batched, books_batched = in_batched
  if books_batched:
    if not rows_batched:
      rows = jnp.broadcast_to(rows, (axis_size, *rows.shape))
    return jax.lax.map(lambda pair: decode_rows(*pair), (rows, codebooks)), True
  out = decode_rows(rows.reshape(-1, rows.shape[-1]), codebooks)
  return out.reshape(*rows.shape[:2], -1), True
