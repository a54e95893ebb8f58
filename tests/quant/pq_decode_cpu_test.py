"""pq_decode_cpu: the compiled kernel is built wherever a C++ compiler is; it equals the XLA
gather bit for bit, its rows split over threads (NaN for an out-of-range code); sharded over
the rows it runs on each device's rows with no collective; under shard_map and jax.grad it
composes like the gather."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lumenvq.quant import pq_codec, pq_decode_cpu


@pytest.fixture(scope="module", autouse=True)
def kernel(cxx_compiler):
  if not pq_decode_cpu.available():
    assert cxx_compiler is None, "a C++ compiler is here but the kernel was not built"
    pytest.skip("no C++ compiler: the kernel is not built, pq_codec uses the XLA gather")


def _gather(rows, codebooks):
  return pq_codec._gather_rows(jnp.asarray(rows), codebooks)


def _case(rng, n, g, c, s, dtype):
  codebooks = rng.standard_normal((g, c, s)).astype(np.float32)
  return rng.integers(0, c, (n, g)).astype(dtype), codebooks


def _decode(rows, codebooks):
  """The kernel under a fresh jit, so it is traced with the current threads_per_device."""
  return jax.jit(lambda r, c: pq_decode_cpu.decode_rows(r, c))(rows, codebooks)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request, monkeypatch):
  monkeypatch.setattr(pq_decode_cpu, "threads_per_device", lambda devices: request.param)


@pytest.mark.parametrize(
    "g,c,s,dtype",
    [
        (4, 256, 8, np.uint8),
        (3, 1000, 2, np.uint16),
        (2, 300, 12, np.int32),
        (5, 17, 4, np.uint8),
        (2, 65536, 16, np.uint16),
        (1, 3, 32, np.int32),
    ],
)
def test_kernel_equals_the_gather(g, c, s, dtype, threads):
  # 3,000 rows: several blocks of rows, shared by the threads.
  rows, codebooks = _case(np.random.default_rng(g * s), 3000, g, c, s, dtype)
  want = np.concatenate([codebooks[i][rows[:, i]] for i in range(g)], axis=-1)
  got = _decode(rows, codebooks)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(pq_codec._gather_rows(jnp.asarray(rows), codebooks), want)


@pytest.mark.parametrize("s", [8, 12])
def test_many_blocks_with_bad_codes_equal_the_gather(s, threads):
  rows, codebooks = _case(np.random.default_rng(s), 70_000, 4, 256, s, np.uint8)
  rows = rows.astype(np.int32)
  rows[::1001, 1] = 256  # Out of range, in every block of rows: NaN subvectors.
  got = np.asarray(_decode(rows, codebooks))
  want = np.asarray(pq_codec._gather_rows(jnp.asarray(rows), codebooks))
  np.testing.assert_array_equal(got, want)
  assert np.isnan(got[::1001, s : 2 * s]).all()


def test_out_of_range_codes_give_nan_subvectors():
  codebooks = np.ones((2, 4, 3), np.float32)
  rows = np.array([[0, 3], [4, 1], [-1, 2]], np.int32)
  got = np.asarray(_decode(rows, codebooks))
  np.testing.assert_array_equal(np.isnan(got), np.repeat([[0, 0], [1, 0], [1, 0]], 3, axis=1))
  np.testing.assert_array_equal(
      np.isnan(got), np.isnan(pq_codec._gather_rows(jnp.asarray(rows), codebooks))
  )


def test_sharded_rows_decode_on_their_devices():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  codes, codebooks = _case(np.random.default_rng(0), 64 * 3, 4, 256, 8, np.uint8)
  codes = codes.reshape(64, 3, 4)
  decode = jax.jit(pq_codec.decode)
  args = (
      jax.device_put(codes, NamedSharding(mesh, P("data"))),
      jax.device_put(codebooks, NamedSharding(mesh, P())),
  )
  hlo = decode.lower(*args).compile().as_text()
  assert pq_decode_cpu.TARGET in hlo
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in hlo
  out = decode(*args)
  assert out.sharding.spec[0] == "data"
  np.testing.assert_array_equal(
      out, pq_codec._gather_rows(jnp.asarray(codes.reshape(-1, 4)), codebooks).reshape(64, 3, 32)
  )


def test_under_shard_map_and_grad_like_the_gather():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  codes, codebooks = _case(np.random.default_rng(1), 32, 4, 256, 8, np.uint8)

  def local(codes, codebooks):
    return jax.lax.psum((pq_codec.decode(codes, codebooks) ** 2).sum(), "data")

  mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
  gathered = (pq_codec._gather_rows(jnp.asarray(codes), codebooks) ** 2).sum()
  np.testing.assert_allclose(mapped(codes, codebooks), gathered, rtol=1e-5)
  grad = jax.grad(lambda cb: (pq_codec.decode(codes, cb) ** 2).sum())(codebooks)
  want = jax.grad(lambda cb: (pq_codec._gather_rows(jnp.asarray(codes), cb) ** 2).sum())(codebooks)
  np.testing.assert_allclose(grad, want)


def test_each_cpu_device_gets_its_share_of_the_cores():
  cores = os.cpu_count()
  assert pq_decode_cpu.threads_per_device(1) == cores
  assert pq_decode_cpu.threads_per_device(8) == max(1, cores // 8)
  assert pq_decode_cpu.threads_per_device(64) == max(1, cores // 8)  # 8 here, the rest away.
  rows, books = np.zeros((16, 2), np.uint8), np.zeros((2, 3, 4), np.float32)

  def threads(decode, *args):
    hlo = jax.jit(decode).lower(*args).compile().as_text()
    return {int(t) for t in re.findall(r"threads=(\d+)", hlo.replace(" ", ""))}

  assert threads(pq_decode_cpu.decode_rows, rows, books) == {cores}  # One device: every core.
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))):
    assert threads(pq_decode_cpu.decode_rows, rows, books) == {cores}
  sharded = jax.device_put(rows, NamedSharding(mesh, P("data")))
  assert threads(pq_decode_cpu.decode_rows, sharded, books) == {max(1, cores // 8)}
  mapped = jax.shard_map(
      pq_decode_cpu.decode_rows, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")
  )
  assert threads(mapped, rows, books) == {max(1, cores // 8)}


def test_vmap_over_codes_and_over_codebooks():
  rng = np.random.default_rng(2)
  codes, codebooks = _case(rng, 30, 4, 256, 8, np.uint8)
  codes = codes.reshape(3, 10, 4)
  books = rng.standard_normal((3, 4, 256, 8)).astype(np.float32)
  got = jax.jit(jax.vmap(pq_codec.decode, in_axes=(0, None)))(codes, codebooks)
  np.testing.assert_array_equal(got, np.stack([_gather(c, codebooks) for c in codes]))
  got = jax.vmap(pq_codec.decode)(codes, books)
  np.testing.assert_array_equal(got, np.stack([_gather(c, b) for c, b in zip(codes, books)]))
  got = jax.vmap(pq_codec.decode, in_axes=(None, 0))(codes[0], books)
  np.testing.assert_array_equal(got, np.stack([_gather(codes[0], b) for b in books]))
