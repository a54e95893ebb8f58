"""Token pruning (variable-rate memory): which tokens are kept, that budget 1.0 is the
unpruned reader exactly, that pruned memory through stored rows (positions beside codes)
equals the on-the-fly forward, the learned score's and the vq_lm head's gradients, and the
settings' errors."""

import dataclasses
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import readers, reader_models, token_pruning
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.model.token_pruning import TokenPruning

CONFIG = T5Config(
    vocab_size=40,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=2,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
K, LP, LQ = 2, 8, 4
_RNG = np.random.RandomState(0)
PASSAGES = np.zeros((2, K, LP), np.int32)
for (b, k), n in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [8, 5, 3, 0]):  # (1, 1): absent.
  PASSAGES[b, k, :n] = _RNG.randint(1, CONFIG.vocab_size, n)
QUESTION = np.array([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
DECODER = np.array([[1, 2, 3], [4, 5, 0]], np.int32)


def _reader(arch="lumen", pruning=None, **kwargs):
  config = ReaderConfig(
      architecture=arch,
      num_passages=K,
      passage_length=LP,
      codebook_size=16,
      subspace_dim=4,
      token_pruning=pruning,
      **kwargs,
  )
  return readers.make_reader(CONFIG, config)


def _init(module, seed=0):
  return readers.init_variables(module, jax.random.PRNGKey(seed), batch_size=2, question_length=LQ)


def _seeded_vq(module):
  """LUMEN-VQ variables whose codebooks one train step seeded."""
  variables = nn.meta.unbox(_init(module))
  _, state = module.apply(
      variables,
      PASSAGES.reshape(-1, LP),
      method=readers.Reader.compute_memory,
      mutable=["quantizer"],
      rngs={"quantizer": jax.random.PRNGKey(1)},
  )
  return {**variables, **state}


def test_select_keeps_the_top_real_tokens_in_order():
  scores = jnp.array([[0.1, 0.9, 0.5, 0.7, 0.0, 3.0]])
  mask = jnp.array([[True, True, True, True, True, False]])
  index, kept = token_pruning.select(scores, mask, 3)
  np.testing.assert_array_equal(index, [[1, 2, 3]])
  assert np.asarray(kept).all()
  short = jnp.array([[True, True, False, False, False, False]])
  index, kept = map(np.asarray, token_pruning.select(scores, short, 3))
  np.testing.assert_array_equal(index[0, :2], [0, 1])  # Both real tokens, in order, first.
  np.testing.assert_array_equal(kept, [[True, True, False]])
  # A passage's own count: the best 2 of its real tokens, in order, then a masked slot.
  index, kept = map(np.asarray, token_pruning.select(scores, mask, 3, jnp.array([2])))
  np.testing.assert_array_equal(index[0, :2], [1, 3])
  np.testing.assert_array_equal(kept, [[True, True, False]])


def test_budget_is_a_share_of_each_passages_real_tokens():
  p = TokenPruning(budget=0.5)
  np.testing.assert_array_equal(p.kept_tokens([0, 1, 3, 5, 8, 48]), [0, 1, 2, 3, 4, 24])
  assert p.kept_length(48) == 24 and TokenPruning(budget=0.01).kept_tokens(48) == 1
  module = _reader("lumen_vq", TokenPruning(method="first", budget=0.5))
  memory = module.apply(
      _seeded_vq(module), PASSAGES, return_codes=True, method=readers.Reader.compute_memory
  )
  # Real tokens [[8, 5], [3, 0]] keep [[4, 3], [2, 0]]: 'first' keeps the first of each.
  np.testing.assert_array_equal(memory.mask.sum(-1), [[4, 3], [2, 0]])
  np.testing.assert_array_equal(memory.positions[0, 1, :3], [0, 1, 2])
  np.testing.assert_array_equal(memory.positions[1, 0, :2], [0, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=0.0), r"TokenPruning.budget=0.0"),
        (dict(budget=1.5), r"TokenPruning.budget=1.5"),
        (dict(method="entropy"), r"TokenPruning.method='entropy'"),
        (dict(head_loss_weight=-1.0), r"TokenPruning.head_loss_weight"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TokenPruning(**kwargs)


def test_reader_config_refuses_pruning_it_cannot_store():
  with pytest.raises(ValueError, match="ReaderConfig.token_pruning with architecture='fid'"):
    ReaderConfig(architecture="fid", token_pruning=TokenPruning())
  with pytest.raises(ValueError, match=r"ReaderConfig.passage_length=300 with token_pruning"):
    ReaderConfig(
        architecture="lumen_vq", passage_length=300, codebook_size=256, token_pruning=TokenPruning()
    )


def test_bytes_are_counted_per_real_memory_token():
  t5 = dataclasses.replace(CONFIG, emb_dim=128)
  plain = ReaderConfig(architecture="lumen_vq", passage_length=48, codebook_size=256)
  pruned = dataclasses.replace(plain, num_subspaces=16, token_pruning=TokenPruning(budget=0.5))
  assert plain.memory_bytes_per_token(t5) == 8  # 128 / 16 dims: 8 uint8 codes.
  # Full passages: 24 of 48 tokens, each 16 codes + its position: 17 * 24 / 48.
  assert pruned.memory_bytes_per_token(t5) == 8.5 and pruned.stored_width(128) == 17
  assert pruned.compression_ratio(t5) == pytest.approx(512 / 8.5)
  # Passages of 48 and 10 real tokens keep 24 and 5: 17 * 29 / 58. Padding is free for all.
  assert pruned.memory_bytes_per_token(t5, [48, 10]) == pytest.approx(17 * 29 / 58)
  assert plain.memory_bytes_per_token(t5, [48, 10]) == 8
  light = ReaderConfig(architecture="lumen_light", passage_length=48, light_length=12)
  assert light.memory_bytes_per_token(t5, [48, 10]) == pytest.approx(512 * 22 / 58)  # f32


@pytest.mark.parametrize(
    "arch, method", [("lumen_vq", m) for m in token_pruning.METHODS] + [("lumen", "learned")]
)
def test_budget_one_is_the_unpruned_reader_exactly(arch, method):
  plain = _reader(arch)
  pruned = _reader(arch, TokenPruning(method=method, budget=1.0))
  variables = _seeded_vq(plain) if arch == "lumen_vq" else nn.meta.unbox(_init(plain))
  head = nn.meta.unbox(_init(pruned))["params"].get("token_importance", {})
  both = {
      **variables,
      "params": {**variables["params"], **({"token_importance": head} if head else {})},
  }
  want = plain.apply(variables, QUESTION, PASSAGES, DECODER, DECODER)
  got = pruned.apply(both, QUESTION, PASSAGES, DECODER, DECODER)
  np.testing.assert_array_equal(got, want)


def test_first_on_full_passages_is_lumen_light():
  pruned = _reader("lumen", TokenPruning(method="first", budget=0.5))
  light = _reader("lumen_light", light_length=LP // 2)
  variables = nn.meta.unbox(_init(light))
  full = PASSAGES[:1].copy()  # Its first passage has LP real tokens; the other is absent.
  full[0, 1] = 0
  np.testing.assert_allclose(
      pruned.apply(variables, QUESTION[:1], full, DECODER[:1], DECODER[:1]),
      light.apply(variables, QUESTION[:1], full, DECODER[:1], DECODER[:1]),
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize("method", ["random", "learned", "vq_lm"])
def test_stored_rows_with_positions_give_the_on_the_fly_forward(method):
  module = _reader("lumen_vq", TokenPruning(method=method, budget=0.5))
  variables = _seeded_vq(module)
  memory = module.apply(
      variables, PASSAGES, return_codes=True, method=readers.Reader.compute_memory
  )
  m = LP // 2
  assert memory.vectors.shape == (2, K, m, CONFIG.emb_dim) and memory.positions.shape == (2, K, m)
  np.testing.assert_array_equal(memory.mask.sum(-1), [[4, 3], [2, 0]])  # Half of each.
  assert not np.array_equal(memory.positions[0, 0], np.arange(m))  # Not just the first M.
  width = module.reader.stored_width(CONFIG.emb_dim)
  rows = readers.code_rows(memory, width)
  assert rows.dtype == np.uint8 and rows.shape == (2, K, m, width)
  np.testing.assert_array_equal(rows[..., 0], memory.positions)
  stored = module.apply(
      variables,
      np.asarray(rows),
      memory.mask,
      readers.export_codebooks(variables),
      method=readers.LumenVQ.memory_from_codes,
  )
  np.testing.assert_array_equal(stored.positions, memory.positions)
  got = module.apply(
      variables, QUESTION, stored, DECODER, DECODER, method=readers.Reader.from_memory
  )
  want = module.apply(variables, QUESTION, PASSAGES, DECODER, DECODER)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="ReaderConfig.token_pruning needs rows of"):
    module.apply(
        variables, np.asarray(rows)[..., 1:], memory.mask, method=readers.LumenVQ.memory_from_codes
    )


def test_positions_reach_the_live_encoder():
  """The same kept vectors at other positions give other logits."""
  module = _reader("lumen", TokenPruning(method="random", budget=0.5))
  variables = nn.meta.unbox(_init(module))
  memory = module.apply(variables, PASSAGES, method=readers.Reader.compute_memory)
  moved = memory.replace(positions=jnp.broadcast_to(jnp.arange(LP // 2), memory.positions.shape))
  run = lambda m: module.apply(
      variables, QUESTION, m, DECODER, DECODER, method=readers.Reader.from_memory
  )
  assert not np.allclose(run(memory), run(moved), atol=1e-4)


def test_learned_score_and_vq_lm_head_get_gradients():
  for method, name in (("learned", "keep_score"), ("vq_lm", "vq_lm_head")):
    model = reader_models.ReaderModel(
        CONFIG, _reader("lumen", TokenPruning(method=method, budget=0.5)).reader
    )
    params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), 2, LQ, 3))["params"]
    batch = {
        "question_tokens": QUESTION,
        "passage_tokens": PASSAGES,
        "decoder_input_tokens": DECODER,
        "decoder_target_tokens": DECODER,
        "decoder_loss_weights": (DECODER > 0).astype(np.float32),
    }
    grads, (metrics, _) = jax.grad(model.loss_fn, has_aux=True)(
        params, batch, jax.random.PRNGKey(1), {}
    )
    kernel = grads["token_importance"][name]["kernel"]
    assert np.abs(np.asarray(kernel)).sum() > 0, method
    assert ("token_pruning/vq_lm_loss" in metrics) == (method == "vq_lm")


def test_random_scores_are_a_fixed_function_of_token_and_position():
  tokens = jnp.array([[5, 5, 7, 9]])
  positions = jnp.arange(4)[None]
  a = token_pruning._hash_scores(tokens, positions)  # pylint: disable=protected-access
  np.testing.assert_array_equal(a, token_pruning._hash_scores(tokens, positions))
  assert len(np.unique(np.asarray(a))) == 4 and 0 <= float(a.min()) and float(a.max()) < 1


def test_gin_files_compose():
  repo = os.path.join(os.path.dirname(__file__), "..", "..")
  gin.clear_config()
  gin.add_config_file_search_path(repo)
  try:
    with gin.unlock_config():
      gin.parse_config_file(os.path.join(repo, "gin_configs/models/tiny.gin"))
      gin.parse_config_file(os.path.join(repo, "gin_configs/architectures/lumen_vq.gin"))
      gin.parse_config_file(os.path.join(repo, "gin_configs/architectures/token_pruning.gin"))
      generic = ReaderConfig()
      gin.clear_config()
      gin.parse_config_file(os.path.join(repo, "gin_configs/demo/lumen_vq_pruned_32x.gin"))
      demo, t5 = ReaderConfig(), T5Config()
  finally:
    gin.clear_config()
  assert generic.token_pruning == TokenPruning(method="learned", budget=0.5)
  assert demo.token_pruning == TokenPruning(method="vq_lm", budget=0.45)
  assert demo.memory_length == 22 and demo.stored_width(t5.emb_dim) == 17
  assert demo.compression_ratio(dataclasses.replace(t5, dtype="bfloat16")) == pytest.approx(
      256 / (17 * 22 / 48)
  )
