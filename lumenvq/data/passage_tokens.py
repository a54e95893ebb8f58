r"""A passage table tokenized once, ahead of training: the token path without SentencePiece per step.

    python -m lumenvq.data.passage_tokens --passages DIR --vocabulary spm.model [--out DIR]

Tokenizing the K = 20 retrieved passages of every example bounds the token path's input at
about 1,700 examples/s on 2 cores (benchmarks/input_pipeline.py), and every epoch tokenizes
the same passages again. As a seqio cached task does for whole examples, this tokenizes each
passage once (SentencePiece's batched encoder, all cores: ~70k demo passages/s); the SeqIO tasks
then look passage tokens up by id (`lookup`) instead of tokenizing texts
(`seqio_tasks.TaskData.passage_tokens`). The ids are the vocabulary's own, equal to its
`encode_tf`, the tokenizer `seqio_tasks.tokenize_passages` runs (tested).

    DIR/manifest.json           written last: the tokens exist once it is there; it names the
                                table's fingerprint and the vocabulary's sha256, which a reader checks
    DIR/shards/<table shard>/   one per passage-table shard, published whole; a rerun keeps it
        tokens.bin              every passage's ids, concatenated: uint16 when the vocabulary has
                                at most 65,536 ids (half the bytes), else int32
        offsets.npy             int64[n + 1] into tokens.bin, in tokens
        stats.json              counts and settings; the shard's commit marker

DIR defaults to PASSAGES/tokens/<the vocabulary's sha256, 16 hex digits> (`default_dir`), so one
table holds the tokens of several vocabularies and the tasks find them without a setting.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import os
from typing import Sequence

import numpy as np
import tqdm

from lumenvq import paths
from lumenvq.data.passage_table import MANIFEST, PassageTable, by_shard, load_array, open_blob

FORMAT_VERSION = 1
SHARD_STATS = "stats.json"
_CHUNK = 1 << 14  # passages per SentencePiece call


@functools.lru_cache(maxsize=None)
def vocabulary_sha256(vocabulary_path: str) -> str:
  """sha256 of a SentencePiece model's bytes: which vocabulary a token table was built with."""
  return hashlib.sha256(paths.path(vocabulary_path).read_bytes()).hexdigest()


def default_dir(passages_dir: str, vocabulary_path: str) -> str:
  return paths.join(passages_dir, "tokens", vocabulary_sha256(vocabulary_path)[:16])


def command(passages_dir: str, vocabulary_path: str, out: str | None = None) -> str:
  """The command that builds the tokens, for messages."""
  flags = f" --out {out}" if out else ""
  return (
      f"python -m lumenvq.data.passage_tokens --passages {passages_dir} "
      f"--vocabulary {vocabulary_path}{flags}"
  )


def _dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def build(
    passages_dir: str, vocabulary_path: str, out: str | None = None, progress: bool = True
) -> dict:
  """Tokenize every passage of the table (shard by shard; finished shards are kept); the manifest."""
  from lumenvq.data import vocab  # pylint: disable=g-import-not-at-top  (seqio: slow to import)

  out = out or default_dir(passages_dir, vocabulary_path)
  table = PassageTable(passages_dir)
  encoder = vocab.get_vocabulary(vocabulary_path).tokenizer  # seqio's SentencePieceProcessor
  dtype = _dtype(encoder.get_piece_size())
  settings = {
      "format_version": FORMAT_VERSION,
      "passages_fingerprint": table.fingerprint,
      "vocabulary_sha256": vocabulary_sha256(vocabulary_path),
      "dtype": dtype.name,
  }
  manifest_path = paths.join(out, MANIFEST)
  paths.path(manifest_path).unlink(missing_ok=True)  # Not complete while shards are (re)built.
  bar = tqdm.tqdm(
      total=len(table),
      desc="tokenize passages",
      unit="passage",
      unit_scale=True,
      disable=not progress,
      mininterval=2,
  )
  shards, start = [], 0
  for shard in table.manifest["shards"]:
    stop = start + shard["num_passages"]
    shards.append(
        _build_shard(
            table, encoder, settings, paths.join(out, "shards", shard["name"]), start, stop, bar
        )
    )
    start = stop
  bar.close()
  manifest = {
      **settings,
      "vocabulary": paths.resolve(vocabulary_path),
      "num_passages": len(table),
      "num_tokens": sum(s["num_tokens"] for s in shards),
      "shards": shards,
  }
  paths.write_text(manifest_path, json.dumps(manifest, indent=1))  # Last: the commit marker.
  return manifest


def _build_shard(table, encoder, settings, shard_dir, start, stop, bar) -> dict:
  marker = paths.path(shard_dir, SHARD_STATS)
  if marker.exists():
    stats = json.loads(marker.read_text())
    if stats["settings"] == settings:
      bar.update(stop - start)
      return stats
  staging = paths.staging_dir(shard_dir)
  offsets = [np.zeros(1, np.int64)]
  with open(os.path.join(staging, "tokens.bin"), "wb") as f:
    for first in range(start, stop, _CHUNK):
      texts = [t.decode("utf-8") for t in table.texts(np.arange(first, min(first + _CHUNK, stop)))]
      ids = encoder.encode(texts, out_type=int, num_threads=os.cpu_count())
      lengths = np.fromiter(map(len, ids), np.int64, len(ids))
      offsets.append(offsets[-1][-1] + np.cumsum(lengths))
      flat = itertools.chain.from_iterable(ids)
      f.write(np.fromiter(flat, settings["dtype"], int(lengths.sum())).tobytes())
      bar.update(len(ids))
  offsets = np.concatenate(offsets)
  with open(os.path.join(staging, "offsets.npy"), "wb") as f:
    np.save(f, offsets)
  stats = {
      "name": os.path.basename(shard_dir),
      "settings": settings,
      "num_passages": stop - start,
      "num_tokens": int(offsets[-1]),
  }
  with open(os.path.join(staging, SHARD_STATS), "w") as f:
    json.dump(stats, f, indent=1)
  paths.publish_dir(staging, shard_dir, SHARD_STATS)
  return stats


def _ranges(begin: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The indices of the ranges [begin, begin + length), concatenated."""
  return np.repeat(begin - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


class _Shard:

  def __init__(self, directory: str, dtype: np.dtype):
    self.offsets = load_array(directory, "offsets.npy")
    path = paths.join(directory, "tokens.bin")
    self.dtype, self.remote = dtype, paths.is_remote(path)
    if self.remote:
      self.blob = open_blob(path)
    else:  # Typed, so a lookup is one fancy index (np.memmap refuses an empty file).
      self.tokens = np.memmap(path, dtype, "r") if os.path.getsize(path) else np.zeros(0, dtype)

  def read(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated tokens of passages `local` (ids within the shard) and their lengths."""
    begin = np.asarray(self.offsets[local], np.int64)
    lengths = np.asarray(self.offsets[local + 1], np.int64) - begin
    if not self.remote:
      return self.tokens[_ranges(begin, lengths)], lengths
    size = self.dtype.itemsize
    parts = [self.blob[b * size : (b + n) * size] for b, n in zip(begin.tolist(), lengths.tolist())]
    return np.frombuffer(b"".join(parts), self.dtype), lengths


class PassageTokens:
  """Read side: `lookup(ids, eos_id)` -> the passages' tokens as `seqio_tasks.tokenize_passages`
  makes them. Opened lazily and memory-mapped (on gs:// as `passage_table.open_blob` reads),
  like `PassageTable`."""

  def __init__(self, directory: str, table: PassageTable, vocabulary_path: str):
    self.directory = directory
    path = paths.join(directory, MANIFEST)
    if not paths.path(path).exists():
      raise FileNotFoundError(
          f"{directory} holds no finished passage tokens ({MANIFEST} is missing); build them "
          f"with: {command(table.directory, vocabulary_path, directory)}"
      )
    self.manifest = json.loads(paths.path(path).read_text())
    want = {
        "format_version": FORMAT_VERSION,
        "passages_fingerprint": table.fingerprint,
        "vocabulary_sha256": vocabulary_sha256(vocabulary_path),
    }
    wrong = {k: self.manifest.get(k) for k, v in want.items() if self.manifest.get(k) != v}
    if wrong:
      raise ValueError(
          f"{path} does not belong to the passage table {table.directory} and the vocabulary "
          f"{vocabulary_path}: it has {wrong}, they need { {k: want[k] for k in wrong} }; "
          f"rebuild it with: {command(table.directory, vocabulary_path, directory)}"
      )
    self._dtype = np.dtype(self.manifest["dtype"])
    self._starts = np.cumsum([0] + [s["num_passages"] for s in self.manifest["shards"]])
    self._shards: list[_Shard | None] = [None] * len(self.manifest["shards"])

  def __len__(self) -> int:
    return int(self.manifest["num_passages"])

  def _holds(self, n: int) -> str:
    return f"{self.directory} holds {n} passages (ids 0..{n - 1}, -1 for none)"

  def _shard(self, s: int) -> _Shard:
    if self._shards[s] is None:
      name = self.manifest["shards"][s]["name"]
      self._shards[s] = _Shard(paths.join(self.directory, "shards", name), self._dtype)
    return self._shards[s]

  def lookup(self, passage_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 [..., L]: each passage's ids then EOS, 0-padded to the longest; all 0 for a -1 id."""
    reads = [  # (rows of the flattened ids, their tokens concatenated, their lengths)
        (rows, *self._shard(s).read(local))
        for s, rows, local in by_shard(self._starts, passage_ids, self._holds)
    ]
    width = 1 + max((int(n.max()) for _, _, n in reads), default=0)
    out = np.zeros((np.size(passage_ids), width), np.int32)
    for rows, tokens, lengths in reads:
      out[np.repeat(rows, lengths), _ranges(np.zeros_like(lengths), lengths)] = tokens
      out[rows, lengths] = eos_id
    return out.reshape(*np.shape(passage_ids), width)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.passage_tokens", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--passages", required=True, help="a passage table (lumenvq.data.passages)")
  parser.add_argument("--vocabulary", required=True, help="the SentencePiece .model of the task")
  parser.add_argument("--out", help="default: PASSAGES/tokens/<vocabulary sha256, 16 digits>")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  manifest = build(args.passages, args.vocabulary, args.out, progress=not args.no_progress)
  print(
      f"{manifest['num_passages']} passages, {manifest['num_tokens']} tokens "
      f"({manifest['dtype']}) -> {args.out or default_dir(args.passages, args.vocabulary)}"
  )


if __name__ == "__main__":
  main()
