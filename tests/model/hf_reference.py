"""Writes random tiny transformers T5 1.1 models and their outputs for hf_parity_test.

    python tests/model/hf_reference.py OUT_DIR

Runs in its own process: torch (and the triton it pulls in) crashes when
imported into a process that already holds jaxlib and tensorflow, so the
parity test never imports torch itself.
"""

import json
import pathlib
import sys

import numpy as np

VOCAB = 97
LAYOUTS = ("untied_hub_layout", "transformers_v5_save")


def _batch(rng, batch, length, lengths):
  tokens = rng.randint(2, VOCAB, size=(batch, length))
  for i, n in enumerate(lengths):
    tokens[i, n:] = 0
  return tokens


def inputs():
  """The token batches both sides use (deterministic)."""
  rng = np.random.RandomState(1)
  enc = _batch(rng, 3, 30, [30, 17, 5])  # long enough for the log-spaced buckets
  dec_in = _batch(rng, 3, 12, [12, 9, 4])
  dec_in[:, 0] = 0
  dec_target = np.concatenate([dec_in[:, 1:], np.full((3, 1), 5)], axis=1)
  dec_target[dec_in == 0] = 0
  dec_target[:, 0] = np.where(dec_target[:, 0] == 0, 5, dec_target[:, 0])
  greedy_enc = _batch(np.random.RandomState(2), 4, 16, [16, 11, 7, 3])
  return enc, dec_in, dec_target, greedy_enc


def _save_untied_like_the_hub(hf, directory):
  """transformers >= 5 always ties T5's head; hub T5 1.1 files are untied:
  write the file and config the way the hub has them."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.5)
  hf.save_pretrained(directory)
  safetensors.torch.save_file(
      {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()},
      str(directory / "model.safetensors"),
  )
  config = json.loads((directory / "config.json").read_text())
  config.pop("scale_decoder_outputs", None)
  config["tie_word_embeddings"] = False
  (directory / "config.json").write_text(json.dumps(config))


def write(out: pathlib.Path, layout: str):
  import torch  # pylint: disable=g-import-not-at-top  (only in this process: see above)
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=VOCAB,
      d_model=32,
      d_kv=8,
      d_ff=48,
      num_layers=2,
      num_decoder_layers=3,
      num_heads=4,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=20,
      dropout_rate=0.0,
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
      decoder_start_token_id=0,
      pad_token_id=0,
      eos_token_id=1,
  )
  hf = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():  # default init leaves some weights tiny; make every one matter
    for p in hf.parameters():
      p.normal_(0.0, 0.5)
  model_dir = out / layout
  model_dir.mkdir(parents=True)
  if layout == "untied_hub_layout":
    _save_untied_like_the_hub(hf, model_dir)
  else:
    hf.save_pretrained(model_dir)

  enc, dec_in, _, greedy_enc = inputs()
  with torch.no_grad():
    t_enc = torch.tensor(enc)
    result = hf(
        input_ids=t_enc, attention_mask=(t_enc != 0).long(), decoder_input_ids=torch.tensor(dec_in)
    )
    # Greedy reference: the full forward re-run on the growing prefix (no cache;
    # generate()'s cache breaks when decoder and encoder depths differ).
    t_enc = torch.tensor(greedy_enc)
    prefix = torch.zeros((len(greedy_enc), 1), dtype=torch.long)
    for _ in range(8):
      logits = hf(
          input_ids=t_enc,
          attention_mask=(t_enc != 0).long(),
          decoder_input_ids=prefix,
          use_cache=False,
      ).logits
      prefix = torch.cat([prefix, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
  np.savez(
      out / f"{layout}.npz",
      encoded=result.encoder_last_hidden_state.numpy(),
      logits=result.logits.numpy(),
      greedy=prefix[:, 1:].numpy(),
  )


if __name__ == "__main__":
  for name in LAYOUTS:
    write(pathlib.Path(sys.argv[1]), name)
