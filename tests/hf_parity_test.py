"""Parity with Hugging Face T5 1.1: a random tiny transformers model, converted with
`python -m lumenvq.convert_checkpoint --from hf`, gives the same encoder outputs,
logits (1e-4, fp32) and greedy tokens."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from lumenvq import decoding, network, param_io
from lumenvq.network_config import T5Config

VOCAB = 97


def _save_untied_like_the_hub(hf, directory):
  """transformers >= 5 always ties T5's head; hub T5 1.1 files are untied:
  write the file and config the way the hub has them."""
  with torch.no_grad():
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.5)
  hf.save_pretrained(directory)
  safetensors.torch.save_file(
      {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()},
      str(directory / "model.safetensors"))
  config = json.loads((directory / "config.json").read_text())
  config.pop("scale_decoder_outputs", None)
  config["tie_word_embeddings"] = False
  (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["untied_hub_layout", "transformers_v5_save"])
def converted(request, tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
      num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, dropout_rate=0.0,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():  # default init leaves some weights tiny; make every one matter
    for p in hf.parameters():
      p.normal_(0.0, 0.5)
  src = tmp_path_factory.mktemp("hf")
  if request.param == "untied_hub_layout":
    _save_untied_like_the_hub(hf, src)
  else:
    hf.save_pretrained(src)
  dst = tmp_path_factory.mktemp("converted") / "t5"
  subprocess.run([sys.executable, "-m", "lumenvq.convert_checkpoint", "--from", "hf",
                  str(src), "--to", str(dst)], check=True)
  gin_text = (dst / "model.gin").read_text()
  assert "T5Config.emb_dim = 32" in gin_text
  config = T5Config(vocab_size=VOCAB, emb_dim=32, head_dim=8, mlp_dim=48,
                    num_encoder_layers=2, num_decoder_layers=3, num_heads=4,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, dropout_rate=0.0,
                    dtype="float32")
  params = param_io.restore_params(str(dst / "params"), network.abstract_params(config))
  return hf, config, params


def _batch(rng, batch, length, lengths):
  tokens = rng.randint(2, VOCAB, size=(batch, length))
  for i, n in enumerate(lengths):
    tokens[i, n:] = 0
  return tokens


def test_encoder_and_logits_match(converted):
  hf, config, params = converted
  rng = np.random.RandomState(1)
  enc = _batch(rng, 3, 30, [30, 17, 5])  # long enough to use the log-spaced buckets
  dec_in = _batch(rng, 3, 12, [12, 9, 4])
  dec_in[:, 0] = 0
  dec_target = np.concatenate([dec_in[:, 1:], np.full((3, 1), 5)], axis=1)
  dec_target[dec_in == 0] = 0
  dec_target[:, 0] = np.where(dec_target[:, 0] == 0, 5, dec_target[:, 0])
  model = network.Transformer(config)
  ours_enc = model.apply({"params": params}, jnp.asarray(enc), method=network.Transformer.encode)
  ours_logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in),
                            jnp.asarray(dec_target))
  with torch.no_grad():
    t_enc = torch.tensor(enc)
    out = hf(input_ids=t_enc, attention_mask=(t_enc != 0).long(),
             decoder_input_ids=torch.tensor(dec_in))
  enc_mask = enc != 0
  np.testing.assert_allclose(np.asarray(ours_enc)[enc_mask],
                             out.encoder_last_hidden_state.numpy()[enc_mask], atol=1e-4, rtol=1e-4)
  # HF's decoder has no target padding mask; compare the positions both see alike.
  valid = dec_target != 0
  np.testing.assert_allclose(np.asarray(ours_logits)[valid],
                             out.logits.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_greedy_decoding_matches(converted):
  hf, config, params = converted
  rng = np.random.RandomState(2)
  enc = _batch(rng, 4, 16, [16, 11, 7, 3])
  model = network.Transformer(config)
  encoded = model.apply({"params": params}, jnp.asarray(enc), method=network.Transformer.encode)
  ours = decoding.greedy_decode(model, params, encoded, jnp.asarray(enc > 0), max_length=8,
                                eos_id=-1)  # no early stop: compare all 8 steps
  # Reference: transformers' full forward re-run on the growing prefix (no cache;
  # its generate() cache breaks when decoder and encoder depths differ).
  t_enc = torch.tensor(enc)
  prefix = torch.zeros((4, 1), dtype=torch.long)
  with torch.no_grad():
    for _ in range(8):
      logits = hf(input_ids=t_enc, attention_mask=(t_enc != 0).long(),
                  decoder_input_ids=prefix, use_cache=False).logits
      prefix = torch.cat([prefix, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
  theirs = prefix[:, 1:]
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
