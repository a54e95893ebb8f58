"""The fingerprint of a model, vocabulary and passage table, and its fields unknown."""

import dataclasses
import hashlib
import json

from lumenvq.data import passages
from lumenvq.memory import store_fingerprint
from lumenvq.model import reader_models
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.model.token_pruning import TokenPruning


def test_fingerprint_for_hashes_vocabulary_and_table(tmp_path):
  source = tmp_path / "source.json"
  source.write_text(
      json.dumps(
          {
              "wikipedia_id": "1",
              "wikipedia_title": "T",
              "text": ["T\n", "some words in a paragraph\n"],
          }
      )
      + "\n"
  )
  passages.build(str(source), str(tmp_path / "table"), words=3, progress=False)
  vocabulary = tmp_path / "spm.model"
  vocabulary.write_bytes(b"not really a model, but bytes to hash")
  model = reader_models.ReaderModel(
      T5Config(
          emb_dim=32,
          num_heads=2,
          head_dim=16,
          mlp_dim=64,
          num_encoder_layers=3,
          num_decoder_layers=1,
      ),
      ReaderConfig(
          architecture="lumen_vq",
          passage_length=8,
          codebook_size=256,
          subspace_dim=8,
          num_residual=2,
      ),
  )
  fingerprint = store_fingerprint.fingerprint_for(
      model, 1000, str(vocabulary), str(tmp_path / "table")
  )
  manifest = json.loads((tmp_path / "table" / "manifest.json").read_text())
  assert fingerprint == {
      "checkpoint_step": 1000,
      "architecture": "lumen_vq",
      "num_memory_layers": 2,
      "emb_dim": 32,
      "passage_length": 8,
      "memory_length": 8,
      "quantizer": {"num_subspaces": 4, "codebook_size": 256, "num_residual": 2},
      "token_pruning": None,
      "vocabulary_sha256": hashlib.sha256(vocabulary.read_bytes()).hexdigest(),
      "passage_table_sha256": manifest["fingerprint"],
  }
  pruned = dataclasses.replace(model.reader, token_pruning=TokenPruning("vq_lm", budget=0.5))
  assert store_fingerprint.fingerprint_for(
      reader_models.ReaderModel(model.config, pruned), None, None, None
  )["token_pruning"] == {
      "method": "vq_lm",
      "budget": 0.5,
      "position_prior": 0.0,
      "head_loss_weight": 1.0,
  }
  unknown = store_fingerprint.fingerprint_for(model, None, None, None)
  assert unknown["checkpoint_step"] is unknown["vocabulary_sha256"] is None
  assert unknown["passage_table_sha256"] is None
