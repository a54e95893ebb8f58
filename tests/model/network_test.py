"""The T5 1.1 network: split encoder, logical axes, dtypes, dropout, gin sizes."""

import glob
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumenvq.model import network
from lumenvq.model.network_config import T5Config
from lumenvq.training import param_io

CONFIG = T5Config(
    vocab_size=50,
    emb_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=64,
    num_encoder_layers=3,
    num_decoder_layers=2,
    dropout_rate=0.1,
    dtype="float32",
)
GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "gin_configs", "models")


def _tokens(seed, shape):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 50, shape))


def test_encoder_runs_in_two_parts():
  model = network.Transformer(CONFIG)
  variables = network.init_variables(CONFIG, jax.random.PRNGKey(0))
  enc = _tokens(0, (2, 9)).at[1, 6:].set(0)
  full = model.apply(variables, enc, method=network.Transformer.encode)

  def split(m, tokens, n):
    x = m.embed(tokens, deterministic=True)
    x = m.encode_layers(x, tokens > 0, 0, n, deterministic=True)
    x = m.encode_layers(x, tokens > 0, n, CONFIG.num_encoder_layers, deterministic=True)
    return m.encode_finalize(x, deterministic=True)

  for n in range(CONFIG.num_encoder_layers + 1):
    np.testing.assert_allclose(
        model.apply(variables, enc, n, method=split), full, rtol=1e-6, atol=1e-6
    )
  with pytest.raises(ValueError, match=r"\[2, 5\) is outside \[0, 3\)"):
    model.apply(
        variables,
        enc,
        method=lambda m, t: m.encode_layers(
            m.embed(t, deterministic=True), t > 0, 2, 5, deterministic=True
        ),
    )


def test_every_parameter_has_logical_axes():
  boxed = network.init_variables(CONFIG, jax.random.PRNGKey(0))["params"]
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  names = param_io.flat_names(boxed)
  assert "encoder/layers_0/attention/query/kernel" in names
  assert "decoder/layers_1/encoder_decoder_attention/out/kernel" in names
  assert names["encoder/relpos_bias/rel_embedding"].shape == (4, 32)
  assert boxed["decoder"]["logits_dense"]["kernel"].names == ("embed", "vocab")


def test_bf16_activations_fp32_params():
  config = T5Config(
      vocab_size=50,
      emb_dim=32,
      num_heads=4,
      head_dim=8,
      mlp_dim=64,
      num_encoder_layers=1,
      num_decoder_layers=1,
  )
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32
  variables = network.init_variables(config, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables)))
  encoded = network.Transformer(config).apply(
      variables, _tokens(1, (2, 5)), method=network.Transformer.encode
  )
  assert encoded.dtype == jnp.bfloat16


def test_dropout_is_rng_driven():
  model = network.Transformer(CONFIG)
  variables = network.init_variables(CONFIG, jax.random.PRNGKey(0))
  args = (_tokens(2, (2, 6)), _tokens(3, (2, 4)), _tokens(4, (2, 4)))
  plain = model.apply(variables, *args)
  np.testing.assert_array_equal(plain, model.apply(variables, *args))
  drop = lambda seed: model.apply(
      variables, *args, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(seed)}
  )
  np.testing.assert_array_equal(drop(0), drop(0))
  assert not np.allclose(drop(0), drop(1)) and not np.allclose(drop(0), plain)


def test_decoder_is_causal():
  model = network.Transformer(CONFIG)
  variables = network.init_variables(CONFIG, jax.random.PRNGKey(0))
  enc, dec = _tokens(5, (1, 6)), _tokens(6, (1, 5))
  a = model.apply(variables, enc, dec, dec)
  b = model.apply(variables, enc, dec.at[0, 3:].set(7), dec.at[0, 3:].set(7))
  np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-6)
  assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize(
    "size,emb,mlp,layers,heads,millions",
    [
        ("small", 512, 1024, 8, 6, 77),
        ("base", 768, 2048, 12, 12, 248),
        ("large", 1024, 2816, 24, 16, 783),
        ("xl", 2048, 5120, 24, 32, 2850),
        ("xxl", 4096, 10240, 24, 64, 11300),
    ],
)
def test_size_gin_files_have_t5_1_1_dimensions(size, emb, mlp, layers, heads, millions):
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_file(os.path.join(GIN_DIR, f"{size}.gin"))
    config = T5Config()
  gin.clear_config()
  assert (
      config.emb_dim,
      config.mlp_dim,
      config.num_encoder_layers,
      config.num_decoder_layers,
      config.num_heads,
      config.head_dim,
  ) == (emb, mlp, layers, layers, heads, 64)
  count = sum(
      int(np.prod(x.shape))
      for x in jax.tree_util.tree_leaves(nn.meta.unbox(network.abstract_params(config)))
  )
  assert abs(count / 1e6 - millions) / millions < 0.02, count


def test_all_sizes_present():
  found = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(GIN_DIR, "*.gin"))}
  assert {"tiny", "small", "base", "large", "xl", "xxl"} <= found


def test_logits_via_embedding_ties_the_output_layer():
  tied = T5Config(**{**CONFIG.__dict__, "logits_via_embedding": True})
  variables = network.init_variables(tied, jax.random.PRNGKey(0))
  assert not any("logits_dense" in n for n in param_io.flat_names(variables["params"]))
  enc, dec = _tokens(1, (2, 7)), _tokens(2, (2, 5))
  logits, state = network.Transformer(tied).apply(
      variables, enc, dec, dec, capture_intermediates=True
  )
  hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
  embedding = nn.unbox(variables["params"]["token_embedder"]["embedding"])
  np.testing.assert_allclose(
      logits, hidden @ embedding.T / np.sqrt(CONFIG.emb_dim), rtol=1e-5, atol=1e-5
  )
