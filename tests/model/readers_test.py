"""FiD / LUMEN / LUMEN-VQ / LUMEN-Light readers: exact identities between the ways of
running them (end to end, from precomputed memory, from codes), masks, parameter names,
codebook updates, gradients, freeze regex, errors and the gin settings."""

import dataclasses
import functools
import os
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import decoding, network, readers
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.quant import pq_codec
from lumenvq.training import param_io, partitioning

CONFIG = T5Config(
    vocab_size=50,
    emb_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=2,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
K, LP, LQ = 3, 6, 5
REPO = os.path.join(os.path.dirname(__file__), "..", "..")
ARCHS = ("fid", "lumen", "lumen_vq", "lumen_light")
# XLA compilation is nearly all of these tests' time; LLVM -O0 halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _tokens(rng, lengths, width):
  out = np.zeros((len(lengths), width), np.int32)
  for row, n in enumerate(lengths):
    out[row, :n] = rng.randint(1, CONFIG.vocab_size, n)
  return out


_RNG = np.random.RandomState(0)
CORPUS = _tokens(_RNG, [6, 4, 5, 2, 6], LP)  # The knowledge source, one row per passage id.
QUESTION = _tokens(_RNG, [5, 3], LQ)  # Row 1 is padded: positions must not depend on it.
DECODER = _tokens(_RNG, [4, 4], 4)
IDS = np.array([[0, 3, 1], [2, 4, -1]])  # -1: no passage retrieved there.


def _passages(ids):
  return np.where((ids >= 0)[..., None], CORPUS[np.maximum(ids, 0)], 0)


def _reader(arch, **overrides):
  kwargs = dict(
      architecture=arch,
      num_passages=K,
      passage_length=LP,
      codebook_size=16,
      subspace_dim=8,
      light_length=LP // 2 if arch == "lumen_light" else None,
  )
  kwargs.update(overrides)
  return readers.make_reader(CONFIG, ReaderConfig(**kwargs))


@functools.lru_cache(maxsize=None)
def _jitted(arch, overrides, method, static):
  """One compiled `apply` per (reader, method, static flags): tests share compilations."""
  module = _reader(arch, **dict(overrides))
  return jax.jit(
      lambda variables, *args, rngs=None: module.apply(
          variables, *args, rngs=rngs, method=method, **dict(static)
      ),
      compiler_options=FAST_COMPILE,
  )


def _run(arch, variables, *args, method=None, overrides=(), rngs=None, **static):
  return _jitted(
      arch,
      tuple(sorted(overrides.items())) if overrides else (),
      method,
      tuple(sorted(static.items())),
  )(variables, *args, rngs=rngs)


@functools.lru_cache(maxsize=None)
def _params():
  """Plain T5's parameter tree (random values): every reader must run on it unchanged."""
  rng = np.random.RandomState(1)
  # T5-like scales (fan-in for matrices, ~1 for norm scales) without an init compilation.
  draw = (
      lambda x: rng.normal(0, x.shape[0] ** -0.5, x.shape)
      if x.ndim == 2
      else (1 + 0.1 * rng.normal(size=x.shape))
  )
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(draw(x), x.dtype), nn.meta.unbox(network.abstract_params(CONFIG))
  )


def _train_step(variables, passage_tokens, seed):
  """The memory encoder with the quantizer collection mutable: a codebook update."""
  return _run(
      "lumen_vq",
      variables,
      passage_tokens,
      method=readers.Reader.compute_memory,
      mutable=("quantizer",),
      rngs={"quantizer": jax.random.PRNGKey(seed)},
  )[1]


@functools.lru_cache(maxsize=None)
def _vq_variables():
  """LUMEN-VQ variables after one train step has seeded the codebooks from the corpus."""
  init = jax.eval_shape(lambda: readers.init_variables(_reader("lumen_vq"), jax.random.PRNGKey(0)))
  zeros = jax.tree_util.tree_map(
      lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(init["quantizer"])
  )
  state = _train_step({"params": _params(), "quantizer": zeros}, CORPUS, 1)
  return {"params": _params(), "quantizer": state["quantizer"]}


def _variables(arch):
  return _vq_variables() if arch == "lumen_vq" else {"params": _params()}


def _logits(arch, ids, **overrides):
  return _run(
      arch, _variables(arch), QUESTION, _passages(ids), DECODER, DECODER, overrides=overrides
  )


def test_num_memory_layers_and_live_fraction_errors():
  n = lambda alpha, layers: ReaderConfig(live_fraction=alpha).num_memory_layers(layers)
  assert n(1 / 3, 24) == 16 and n(1 / 3, 3) == 2 and n(1 / 3, 2) == 1
  assert n(0.5, 3) == 2  # Half rounds up: more memory, less live compute.
  assert n(1.0, 3) == 0  # Everything live: the FiD split.
  assert ReaderConfig(architecture="fid", live_fraction=0.0).num_memory_layers(3) == 0
  for alpha in (0.0, 0.1):
    with pytest.raises(
        ValueError,
        match=rf"live_fraction={alpha} leaves no live encoder " r"layer of num_encoder_layers=3",
    ):
      n(alpha, 3)
  with pytest.raises(ValueError, match=r"live_fraction=1.5: must be in \[0, 1\]"):
    ReaderConfig(live_fraction=1.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(architecture="rag"), r"architecture='rag': expected one of"),
        (
            dict(architecture="lumen_light", passage_length=6, light_length=7),
            r"light_length=7: lumen_light needs 1 <= M <= passage_length=6",
        ),
        (dict(architecture="lumen_light"), r"light_length=None"),
        (dict(architecture="lumen_vq", codebook_size=70000), r"codebook_size=70000"),
        (dict(architecture="fid", freeze_memory_encoder=True), r"fid has no memory encoder"),
        (dict(num_passages=0), r"num_passages=0: must be >= 1"),
    ],
)
def test_config_errors_name_the_setting(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ReaderConfig(**kwargs)


def test_module_errors_name_the_setting():
  with pytest.raises(
      ValueError, match=r"num_subspaces=5: model dimension " r"T5Config.emb_dim=32 is not divisible"
  ):
    ReaderConfig(architecture="lumen_vq", num_subspaces=5).subspaces(32)
  with pytest.raises(ValueError, match=r"subspace_dim=64: .*emb_dim=32"):
    ReaderConfig(architecture="lumen_vq", subspace_dim=64).subspaces(32)
  wrong = readers.Reader(CONFIG, reader=ReaderConfig(architecture="lumen_vq"))
  with pytest.raises(ValueError, match=r"'lumen_vq' is built by readers.LumenVQ, not Reader"):
    jax.eval_shape(lambda: readers.init_variables(wrong, jax.random.PRNGKey(0)))
  memory = functools.partial(
      _reader("lumen").apply, {"params": _params()}, method=readers.Reader.compute_memory
  )
  with pytest.raises(ValueError, match=r"ReaderConfig.passage_length=6"):
    jax.eval_shape(memory, CORPUS[:, :5])
  with pytest.raises(ValueError, match=r"return_codes=True: .*'lumen' stores float memory"):
    jax.eval_shape(functools.partial(memory, return_codes=True), CORPUS)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_names_are_plain_t5(arch):
  boxed = jax.eval_shape(lambda: readers.init_variables(_reader(arch), jax.random.PRNGKey(0)))
  plain = param_io.flat_names(network.abstract_params(CONFIG))
  mine = param_io.flat_names(boxed["params"])
  assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in plain.items()}
  assert set(boxed) == ({"params", "quantizer"} if arch == "lumen_vq" else {"params"})
  if arch == "lumen_vq":
    assert boxed["quantizer"]["quantizer"]["codebooks"].value.shape == (1, 4, 16, 8)


@functools.lru_cache(maxsize=None)
def _plain_t5_fn():
  return jax.jit(
      lambda tokens: network.Transformer(CONFIG).apply(
          {"params": _params()}, tokens, DECODER, DECODER
      ),
      compiler_options=FAST_COMPILE,
  )


def _plain_t5(tokens):
  return _plain_t5_fn()(tokens)


@pytest.mark.parametrize("arch,alpha", [("fid", 1 / 3), ("lumen", 1.0)])
def test_single_passage_fid_is_t5_on_question_then_passage(arch, alpha):
  """n = 0 (FiD, or LUMEN with alpha = 1) is plain T5 on the unpadded concatenation."""
  ids = IDS[:, :1]
  got = _logits(arch, ids, live_fraction=alpha, num_passages=1)
  joined = np.zeros((2, LQ + LP), np.int32)
  for row in range(2):
    text = np.concatenate([QUESTION[row][QUESTION[row] > 0], CORPUS[ids[row, 0]]])
    joined[row, : len(text)] = text
  want = _plain_t5(joined)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  split = _logits("lumen", ids, num_passages=1)
  assert not np.allclose(split, want, atol=1e-3)  # The comparison sees the split.


def _gather(memory, ids):
  """What the store-fed reader does: rows of precomputed memory by retrieved passage id."""
  safe, present = np.maximum(ids, 0), (ids >= 0)[..., None]
  take = lambda x: None if x is None else np.asarray(x)[safe]
  return readers.Memory(take(memory.vectors), take(memory.mask) & present, take(memory.codes))


@pytest.mark.parametrize("arch", ["lumen", "lumen_light"])
def test_precomputed_memory_equals_end_to_end(arch):
  """Memory computed once per corpus passage, gathered per question like the store does."""
  memory = _run(arch, _variables(arch), CORPUS, method=readers.Reader.compute_memory)
  m = LP // 2 if arch == "lumen_light" else LP
  assert memory.vectors.shape == (len(CORPUS), m, CONFIG.emb_dim)
  got = _run(
      arch,
      _variables(arch),
      QUESTION,
      _gather(memory, IDS),
      DECODER,
      DECODER,
      method=readers.Reader.from_memory,
  )
  np.testing.assert_allclose(got, _logits(arch, IDS), rtol=1e-5, atol=1e-5)


def test_lumen_vq_codes_decode_to_the_end_to_end_forward():
  variables = _vq_variables()
  memory = _run(
      "lumen_vq", variables, CORPUS, return_codes=True, method=readers.Reader.compute_memory
  )
  assert memory.codes.dtype == np.uint8 and memory.codes.shape == (len(CORPUS), LP, 4)
  # Bit-identical to encoding the unquantized LUMEN memory with the exported codebooks.
  codebooks = readers.export_codebooks(variables)
  raw = _run("lumen", variables, CORPUS, method=readers.Reader.compute_memory)
  np.testing.assert_array_equal(memory.codes, pq_codec.encode(raw.vectors, codebooks))
  assert len(np.unique(memory.codes)) > 4  # Seeded codebooks, not all-zero ones.
  stored = _gather(memory, IDS)
  decoded = _run(
      "lumen_vq",
      variables,
      stored.codes,
      stored.mask,
      codebooks,
      method=readers.LumenVQ.memory_from_codes,
  )
  own = _reader("lumen_vq").apply(
      variables, stored.codes, stored.mask, method=readers.LumenVQ.memory_from_codes
  )
  np.testing.assert_array_equal(decoded.vectors, own.vectors)  # Own codebooks by default.
  np.testing.assert_allclose(decoded.vectors, stored.vectors, atol=1e-6)
  got = _run(
      "lumen_vq", variables, QUESTION, decoded, DECODER, DECODER, method=readers.Reader.from_memory
  )
  want = _logits("lumen_vq", IDS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(want, _logits("lumen", IDS), atol=1e-3)  # Quantization is used.


def test_lumen_light_keeping_every_token_is_lumen():
  full = _logits("lumen_light", IDS, light_length=LP)
  np.testing.assert_allclose(full, _logits("lumen", IDS), rtol=1e-6, atol=1e-6)
  encoded, mask = _run(
      "lumen_light",
      _variables("lumen_light"),
      QUESTION,
      _passages(IDS),
      method=readers.Reader.encode_passages,
  )
  m = LP // 2
  assert encoded.shape == (2, K * (LQ + m), CONFIG.emb_dim) and mask.shape == (2, K * (LQ + m))
  assert not np.allclose(_logits("lumen_light", IDS), full, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_absent_passages_and_passage_order_do_not_matter(arch):
  ids = np.array([[0, -1, 3], [2, -1, 4]])
  with_gap = _logits(arch, ids)
  without = _logits(arch, ids[:, [0, 2]], num_passages=2)
  np.testing.assert_allclose(with_gap, without, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_logits(arch, ids[:, ::-1]), with_gap, rtol=1e-5, atol=1e-5)
  changed = _logits(arch, ids.clip(0))
  assert not np.allclose(changed, with_gap, atol=1e-3)  # A present passage is read.


def test_codebooks_update_only_when_the_quantizer_collection_is_mutable():
  seeded = _vq_variables()
  state = seeded["quantizer"]["quantizer"]  # Initialised as zeros; one train step seeded it.
  assert bool(state["initialized"]) and np.any(state["codebooks"] != 0)
  other_batch = CORPUS[::-1] * (CORPUS[::-1] % 3 > 0)
  step2 = _train_step(seeded, other_batch, 2)["quantizer"]["quantizer"]
  assert not np.array_equal(step2["ema_counts"], state["ema_counts"])
  assert not np.array_equal(step2["codebooks"], state["codebooks"])
  _, evaluated = _run(
      "lumen_vq", seeded, QUESTION, _passages(IDS), DECODER, DECODER, mutable=("intermediates",)
  )
  assert set(evaluated) == {"intermediates"}  # Eval sows metrics, moves no codebook.
  metrics = evaluated["intermediates"]["quantizer_metrics"][0]
  assert 0 < float(metrics["relative_reconstruction_error"]) < 1
  with pytest.raises(ValueError, match=r"return_codes=True with the 'quantizer' collection"):
    jax.eval_shape(
        functools.partial(
            _reader("lumen_vq").apply,
            seeded,
            CORPUS,
            return_codes=True,
            mutable=["quantizer"],
            rngs={"quantizer": jax.random.PRNGKey(0)},
            method=readers.Reader.compute_memory,
        )
    )


def _kernel_norm(grads, *path):
  return float(jnp.linalg.norm(functools.reduce(lambda t, k: t[k], path, grads)))


def test_gradients_reach_live_encoder_and_through_straight_through_the_memory_encoder():
  module, variables = _reader("lumen_vq"), _vq_variables()
  qvars = {"quantizer": variables["quantizer"]}
  score = lambda logits: jnp.sum(jax.nn.log_softmax(logits)[..., 1])
  probe = np.random.RandomState(2).normal(size=(len(CORPUS), LP, CONFIG.emb_dim))

  def memory_encoder_outputs(params):
    """Quantized memory (straight-through) and the same memory decoded from its codes."""
    memory = module.apply(
        {"params": params, **qvars}, CORPUS, return_codes=True, method=readers.Reader.compute_memory
    )
    from_codes = module.apply(
        qvars,
        memory.codes,
        memory.mask,
        readers.export_codebooks(variables),
        method=readers.LumenVQ.memory_from_codes,
    )
    return [jnp.sum(m.vectors * probe) for m in (memory, from_codes)]

  straight, from_codes = jax.jit(jax.jacrev(memory_encoder_outputs), compiler_options=FAST_COMPILE)(
      _params()
  )
  layer0 = ("encoder", "layers_0", "mlp", "wo", "kernel")
  assert _kernel_norm(straight, *layer0) > 0
  assert _kernel_norm(from_codes, *layer0) == 0  # Codes alone carry no gradient.

  grads = jax.jit(
      jax.grad(
          lambda p: score(
              module.apply({"params": p, **qvars}, QUESTION, _passages(IDS), DECODER, DECODER)
          )
      ),
      compiler_options=FAST_COMPILE,
  )(_params())
  assert _kernel_norm(grads, "encoder", "layers_1", "mlp", "wo", "kernel") > 0  # Live.
  assert _kernel_norm(grads, *layer0) > 0
  assert _kernel_norm(grads, "decoder", "logits_dense", "kernel") > 0


def test_memory_encoder_regex_freezes_layers_below_n():
  names = list(
      param_io.flat_names(
          network.abstract_params(dataclasses.replace(CONFIG, num_encoder_layers=12))
      )
  )
  config = ReaderConfig(freeze_memory_encoder=True)  # n = round(2/3 * 12) = 8.
  (pattern,) = config.frozen_param_patterns(12)
  assert pattern == config.memory_encoder_param_regex(12)
  frozen = {
      m.group(1)
      for m in (re.match(r"encoder/layers_(\d+)/", n) for n in names if re.search(pattern, n))
      if m
  }
  assert frozen == {str(i) for i in range(8)}
  assert all(n.startswith("encoder/layers_") for n in names if re.search(pattern, n))
  assert ReaderConfig().frozen_param_patterns(12) == ()
  assert _reader("lumen", freeze_memory_encoder=True).frozen_param_patterns() == (
      r"^encoder/layers_(0)/",
  )  # On the unbound module, for the trainer.
  with pytest.raises(ValueError, match=r"live_fraction=1.0: no memory encoder layer"):
    ReaderConfig(live_fraction=1.0, freeze_memory_encoder=True).frozen_param_patterns(12)


def test_forward_under_a_sharded_mesh_matches_one_device():
  """Every logical name the readers use resolves under the standard rules on a 4x2 mesh."""
  module, variables = _reader("lumen_vq"), _vq_variables()
  tile = lambda x: np.tile(x, (2,) + (1,) * (x.ndim - 1))
  mesh = partitioning.make_mesh((4, 2))
  with partitioning.axis_rules_and_mesh(mesh, partitioning.standard_logical_axis_rules()):
    got = jax.jit(module.apply, compiler_options=FAST_COMPILE)(
        variables, tile(QUESTION), tile(_passages(IDS)), tile(DECODER), tile(DECODER)
    )
  np.testing.assert_allclose(got, tile(np.asarray(_logits("lumen_vq", IDS))), rtol=1e-5, atol=1e-5)


def test_greedy_decoding_runs_on_a_reader():
  """`decoding` drives readers through the inherited `Transformer.decode` and KV cache."""
  module, variables = _reader("lumen"), {"params": _params()}
  encoded, mask = _run(
      "lumen", variables, QUESTION, _passages(IDS), method=readers.Reader.encode_passages
  )
  tokens = jax.jit(
      functools.partial(decoding.greedy_decode, module, max_length=4), compiler_options=FAST_COMPILE
  )(_params(), encoded, mask)
  shifted = np.pad(np.asarray(tokens)[:, :-1], ((0, 0), (1, 0)))
  forced = np.argmax(
      _run("lumen", variables, QUESTION, _passages(IDS), shifted, np.ones_like(shifted)), -1
  )
  upto_eos = (
      np.cumsum(np.asarray(tokens) == decoding.EOS_ID, axis=1)
      - (np.asarray(tokens) == decoding.EOS_ID)
      == 0
  )
  np.testing.assert_array_equal(np.where(upto_eos, forced, 0), tokens)


def _parse(*files):
  gin.clear_config()
  gin.add_config_file_search_path(REPO)
  with gin.unlock_config():
    for path in files:
      gin.parse_config_file(os.path.join(REPO, path))
    return T5Config(), ReaderConfig()


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_gin_files_compose_with_sizes(arch):
  try:
    t5, config = _parse("gin_configs/models/tiny.gin", f"gin_configs/architectures/{arch}.gin")
  finally:
    gin.clear_config()
  assert config.architecture == arch and t5.emb_dim == 64
  assert type(readers.make_reader(t5, config)) is readers.READERS[arch]
  assert config.num_memory_layers(t5.num_encoder_layers) == (0 if arch == "fid" else 1)
  if arch == "lumen_vq":
    assert config.subspaces(t5.emb_dim) == 4 and config.memory_bytes_per_token(t5) == 8


def test_xxl_lumen_vq_gin_is_the_published_setting():
  try:
    t5, config = _parse("gin_configs/architectures/xxl_lumen_vq.gin")
  finally:
    gin.clear_config()
  assert (t5.emb_dim, t5.num_encoder_layers, config.architecture) == (4096, 24, "lumen_vq")
  assert config.subspaces(t5.emb_dim) == 256 and config.codebook_size == 65536
  assert config.num_memory_layers(t5.num_encoder_layers) == 16
  assert pq_codec.code_dtype(config.codebook_size) == np.uint16
  assert config.memory_bytes_per_token(t5) == 512
  assert config.compression_ratio(t5) == 16
  assert ReaderConfig(architecture="lumen").memory_bytes_per_token(t5) == 8192
