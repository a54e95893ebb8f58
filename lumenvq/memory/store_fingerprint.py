"""What a precomputed memory store's memory depends on: its fingerprint.

`precompute_memory` records it in the store (`MemoryStore.create(fingerprint=...)`), and a
run that reads the store asks for the fields it knows (`MemoryStore.open(
expected_fingerprint=...)`), so memory computed by another checkpoint, quantizer,
vocabulary or passage table is refused by name instead of read as if it were this model's.
"""

import hashlib

import tensorstore as ts

from lumenvq.data.passage_table import PassageTable
from lumenvq.memory.memory_store import StoreError, kvstore_spec


def fingerprint_for(model, checkpoint_step, vocabulary_path, passage_table_dir) -> dict:
  """What a store's memory depends on, for `model` (a reader_models.ReaderModel) restored at
  `checkpoint_step`, tokenized by `vocabulary_path` from the passage table in
  `passage_table_dir`. A store opens only for a reader with the same fingerprint. An
  argument given as None (not known to the caller) gives its field None."""
  reader, t5 = model.reader, model.config
  quantizer = None
  if reader.architecture == "lumen_vq":
    quantizer = {
        "num_subspaces": reader.subspaces(t5.emb_dim),
        "codebook_size": reader.codebook_size,
        "num_residual": reader.num_residual,
    }
  return {
      "checkpoint_step": None if checkpoint_step is None else int(checkpoint_step),
      "architecture": reader.architecture,
      "num_memory_layers": reader.num_memory_layers(t5.num_encoder_layers),
      "emb_dim": t5.emb_dim,
      "passage_length": reader.passage_length,
      "memory_length": reader.memory_length,
      "quantizer": quantizer,
      "token_pruning": (
          None if reader.token_pruning is None else reader.token_pruning.as_fingerprint()
      ),
      "vocabulary_sha256": (
          None
          if vocabulary_path is None
          else hashlib.sha256(_read_file(vocabulary_path)).hexdigest()
      ),
      # The table's own content hash (texts, spans, settings): equal however it is sharded.
      "passage_table_sha256": (
          None if passage_table_dir is None else PassageTable(passage_table_dir).fingerprint
      ),
  }


def _read_file(path: str) -> bytes:
  """A whole file through a kvstore, so `gs://` vocabularies hash like local ones."""
  directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
  result = ts.KvStore.open(kvstore_spec(directory)).result().read(name).result()
  if result.state != "value":
    raise StoreError(f"{path} not found")
  return result.value
