"""Tests for lumenvq.quant.pq_codec: round trips, brute-force agreement, ties, layouts, errors, FAISS."""

import faiss
import jax
import numpy as np
import pytest

from lumenvq.quant import pq_codec


def _random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _brute_force(x, codebooks):
  """float64 argmin and the gap between the two nearest codes, per (row, subspace)."""
  g, c, s = codebooks.shape
  xs = x.reshape(-1, g, 1, s).astype(np.float64)
  dist = ((xs - codebooks[None].astype(np.float64)) ** 2).sum(-1)  # [n, G, C]
  two = np.sort(dist, axis=-1)[..., :2]
  return dist.argmin(-1), two[..., 1] - two[..., 0]


def test_code_dtype():
  assert pq_codec.code_dtype(2) == np.uint8
  assert pq_codec.code_dtype(256) == np.uint8
  assert pq_codec.code_dtype(257) == np.uint16
  assert pq_codec.code_dtype(65536) == np.uint16
  with pytest.raises(ValueError, match="codebook_size=65537"):
    pq_codec.code_dtype(65537)


def test_round_trip_uint8():
  codebooks = _random((4, 256, 8), 0)
  codes = np.random.default_rng(1).integers(0, 256, (3, 40, 4)).astype(np.uint8)
  x = pq_codec.decode(codes, codebooks)
  assert x.shape == (3, 40, 32)
  np.testing.assert_array_equal(x[1, 2, 8:16], codebooks[1, codes[1, 2, 1]])
  back = pq_codec.encode(x, codebooks, chunk_size=100)
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, codes)


def test_round_trip_uint16_chunked():
  codebooks = _random((2, 65536, 4), 2)
  codes = np.random.default_rng(3).integers(0, 65536, (64, 2)).astype(np.uint16)
  codes[0] = 65535  # last code lives in the padded last chunk (65536 = 65 * 1000 + 536)
  x = pq_codec.decode(codes, codebooks)
  back = pq_codec.encode(x, codebooks, chunk_size=1000)
  assert back.dtype == np.uint16
  np.testing.assert_array_equal(back, codes)
  # Chunking never changes the answer on generic vectors either.
  y = _random((64, 8), 4)
  np.testing.assert_array_equal(
      pq_codec.encode(y, codebooks, chunk_size=1000),
      pq_codec.encode(y, codebooks, chunk_size=65536),
  )


@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_encode_matches_brute_force(chunk_size):
  codebooks = _random((3, 300, 5), 5)
  x = _random((500, 15), 6)
  codes = np.asarray(pq_codec.encode(x, codebooks, chunk_size=chunk_size))
  want, gap = _brute_force(x, codebooks)
  clear = gap > 1e-4  # float32 cannot order codes closer than this; all but a few rows
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(codes.reshape(-1, 3)[clear], want[clear])


def test_ties_break_to_lowest_index_across_chunks():
  codebooks = _random((2, 300, 4), 7)
  codebooks[:, 250] = codebooks[:, 3]  # same vector in chunks 0, 1 and 3 (chunk 64)
  codebooks[:, 120] = codebooks[:, 3]
  x = codebooks[:, 3].reshape(1, 8)
  for chunk in (64, 300):
    np.testing.assert_array_equal(pq_codec.encode(x, codebooks, chunk_size=chunk), [[3, 3]])


def test_residual_layout_and_error_drops():
  x = _random((400, 16), 8)
  stage0 = _random((4, 16, 4), 9)
  codes0 = pq_codec.encode(x, stage0)
  residual = x - np.asarray(pq_codec.decode(codes0, stage0))
  # Second stage: codebook taken from residual rows, so it can only help.
  stage1 = residual[:16].reshape(16, 4, 4).transpose(1, 0, 2)
  codebooks = np.stack([stage0, stage1])
  codes = pq_codec.encode(x, codebooks)
  assert codes.shape == (400, 2, 4)
  np.testing.assert_array_equal(codes[:, 0], codes0)
  np.testing.assert_array_equal(codes[:, 1], pq_codec.encode(residual, stage1))
  err1 = ((x - np.asarray(pq_codec.decode(codes0, stage0))) ** 2).sum()
  err2 = ((x - np.asarray(pq_codec.decode(codes, codebooks))) ** 2).sum()
  assert err2 < 0.9 * err1
  with pytest.raises(ValueError, match=r"\[\.\.\., R, G\]"):
    pq_codec.decode(codes.reshape(400, 8), codebooks)


@pytest.mark.parametrize("size", [256, 1024])  # Decode's two gathers: C <= 256 and above.
def test_decode_under_jit_matches_eager(size):
  codebooks = _random((4, size, 8), 10)
  codes = np.random.default_rng(11).integers(0, size, (1000, 4)).astype(pq_codec.code_dtype(size))
  np.testing.assert_array_equal(
      jax.jit(pq_codec.decode)(codes, codebooks), pq_codec.decode(codes, codebooks)
  )
  np.testing.assert_array_equal(
      pq_codec.decode(codes, codebooks).reshape(1000, 4, 8),
      np.asarray(codebooks)[np.arange(4), codes],
  )
  # Inside jit codes cannot be checked: an out-of-range code decodes to NaNs, its
  # neighbours in the same vector and other vectors stay exact.
  codes = np.array([[1, 2, 3, 4], [5, 6, size + 44, 7]], np.uint16)
  got = np.asarray(jax.jit(pq_codec.decode)(codes, codebooks)).reshape(2, 4, 8)
  assert np.isnan(got[1, 2]).all() and not np.isnan(np.delete(got[1], 2, 0)).any()
  np.testing.assert_array_equal(got[0], pq_codec.decode(codes[:1], codebooks).reshape(4, 8))


def test_errors_name_the_setting():
  codebooks = _random((4, 16, 8), 12)
  with pytest.raises(ValueError, match="x last dim 30"):
    pq_codec.encode(_random((2, 30), 0), codebooks)
  with pytest.raises(ValueError, match=r"codes shape \(2, 3\)"):
    pq_codec.decode(np.zeros((2, 3), np.uint8), codebooks)
  with pytest.raises(ValueError, match=r"codes range \[0, 16\].*codebook_size 16"):
    pq_codec.decode(np.array([[0, 1, 2, 16]], np.uint8), codebooks)
  with pytest.raises(ValueError, match="dtype float32: must be an integer"):
    pq_codec.decode(np.zeros((1, 4), np.float32), codebooks)
  with pytest.raises(ValueError, match="codebooks shape"):
    pq_codec.encode(_random((2, 32), 0), codebooks[0])
  with pytest.raises(ValueError, match="chunk_size=0"):
    pq_codec.encode(_random((2, 32), 0), codebooks, chunk_size=0)


def _assert_same_codes(ours, theirs, x, codebooks):
  """Codes agree except on float ties, where both picks must be equally near."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert (ours == theirs).mean() > 0.999
  g, _, s = codebooks.shape
  xs = x.reshape(-1, g, s)
  for row, sub in zip(*np.nonzero(ours != theirs)):
    d_ours = ((xs[row, sub] - codebooks[sub, ours[row, sub]]) ** 2).sum()
    d_theirs = ((xs[row, sub] - codebooks[sub, theirs[row, sub]]) ** 2).sum()
    np.testing.assert_allclose(d_ours, d_theirs, rtol=1e-5, atol=1e-6)


def test_faiss_cross_check_trained_8bit():
  d, m = 32, 4
  train = _random((256 * 40, d), 13)
  pq = faiss.ProductQuantizer(d, m, 8)
  pq.verbose = False
  pq.train(train)
  codebooks = faiss.vector_to_array(pq.centroids).reshape(m, 256, d // m)
  x = _random((2000, d), 14)
  theirs = pq.compute_codes(x)
  ours = pq_codec.encode(x, codebooks)
  assert ours.dtype == np.uint8
  _assert_same_codes(ours, theirs, x, codebooks)
  np.testing.assert_allclose(
      pq_codec.decode(theirs, codebooks), pq.decode(theirs), rtol=1e-6, atol=1e-6
  )


def test_faiss_cross_check_16bit_layout():
  d, m = 16, 2
  pq = faiss.ProductQuantizer(d, m, 16)
  codebooks = _random((m, 65536, d // m), 15)
  faiss.copy_array_to_vector(codebooks.ravel(), pq.centroids)
  x = _random((300, d), 16)
  theirs = pq.compute_codes(x).view(np.uint16)  # 2 little-endian bytes per subspace
  ours = pq_codec.encode(x, codebooks, chunk_size=8192)
  assert ours.dtype == np.uint16
  _assert_same_codes(ours, theirs, x, codebooks)
  np.testing.assert_allclose(
      pq_codec.decode(theirs, codebooks), pq.decode(theirs.view(np.uint8)), rtol=1e-6, atol=1e-6
  )
