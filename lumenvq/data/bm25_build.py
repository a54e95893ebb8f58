"""A bm25s index built from compact token arrays, for corpora that bm25s's own build cannot hold.

Why by hand: `bm25s.BM25.index` takes the whole tokenized corpus as Python lists of ints
(about 36 bytes a token) and counts terms one document at a time in Python; at 5M passages
of 100 words that is ~16 GB of lists before the index exists, more than a 24 GiB machine
has left. Here the token ids of each run of documents are packed into one int32 array as the
tokenizer streams them, term frequencies are counted per run with numpy, and the score
matrix is assembled as bm25s assembles it: the same BM25 formula in the same float64
arithmetic, stored as float32 in the same CSC layout (columns the vocabulary, rows sorted
within a column). The result is a `bm25s.BM25` whose `scores` and `vocab_dict` equal
those `index` would make (tested), so bm25s saves, loads, memory-maps and queries it.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Sequence

import bm25s
import numpy as np

RUN_DOCUMENTS = 1 << 16  # Documents whose tokens are packed into one array.


def _packed_runs(token_ids: Iterable[Sequence[int]]):
  """(int32 tokens, int64 lengths) per run of RUN_DOCUMENTS documents, in order."""
  documents = iter(token_ids)
  while run := list(itertools.islice(documents, RUN_DOCUMENTS)):
    lengths = np.fromiter(map(len, run), np.int64, len(run))
    yield np.fromiter(itertools.chain.from_iterable(run), np.int32, int(lengths.sum())), lengths


def _term_counts(tokens: np.ndarray, lengths: np.ndarray, first_doc: int, vocab_size: int):
  """(doc int32, token int32, term frequency int32) of each distinct term of each document,
  sorted by document, then token."""
  docs = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
  keys, counts = np.unique(docs * vocab_size + tokens, return_counts=True)
  return (
      (keys // vocab_size + first_doc).astype(np.int32),
      (keys % vocab_size).astype(np.int32),
      counts.astype(np.int32),
  )


def build(
    token_ids: Iterable[Sequence[int]], vocab_of: Callable[[], dict], **settings
) -> bm25s.BM25:
  """The Lucene-variant BM25 index of documents given as token id sequences (streamed once),
  whose ids are the values of `vocab_of()` (called after the stream is consumed: a tokenizer
  grows its vocabulary as it streams). settings: `bm25s.BM25`'s (k1, b, method="lucene")."""
  retriever = bm25s.BM25(**settings)
  if retriever.method != "lucene" or retriever.idf_method != "lucene":
    raise ValueError(f"bm25_build: method={retriever.method!r}; only 'lucene' is built here")
  runs = list(_packed_runs(token_ids))
  vocab = dict(vocab_of())
  vocab_size = len(vocab)
  lengths = np.concatenate([r[1] for r in runs] or [np.zeros(0, np.int64)])
  num_docs = len(lengths)
  counted, first = [], 0
  doc_freq = np.zeros(vocab_size, np.int64)
  while runs:
    tokens, run_lengths = runs.pop(0)
    counted.append(_term_counts(tokens, run_lengths, first, vocab_size))
    doc_freq += np.bincount(counted[-1][1], minlength=vocab_size)
    first += len(run_lengths)
  # bm25s's Lucene idf: math.log per term in float64, stored as float32 (0 for unseen terms).
  idf = np.zeros(vocab_size, np.float32)
  for term in np.flatnonzero(doc_freq):
    df = int(doc_freq[term])
    idf[term] = math.log(1 + (num_docs - df + 0.5) / (df + 0.5))
  # bm25s's term-frequency part, vectorised in the float64 it computes per document; run
  # by run, so that its float64 temporaries are those of one run.
  k1, b, avg_len = retriever.k1, retriever.b, lengths.mean() if num_docs else 0.0
  scored = []
  while counted:
    rows, cols, freq = counted.pop(0)
    tf = freq.astype(np.float32)
    norm = k1 * ((1 - b) + b * lengths[rows] / avg_len)
    scored.append((rows, cols, (idf[cols] * (tf / (norm + tf))).astype(np.float32)))
  rows, cols, data = (
      np.concatenate([c[i] for c in scored] or [np.zeros(0, d)])
      for i, d in enumerate((np.int32, np.int32, np.float32))
  )
  del scored
  indptr = np.zeros(vocab_size + 1, np.int64)
  np.cumsum(np.bincount(cols, minlength=vocab_size), out=indptr[1:])
  order = np.argsort(cols, kind="stable")  # Rows are already sorted: (column, row) order.
  del cols
  retriever.scores = {"data": data[order], "num_docs": num_docs, "indptr": indptr}
  del data
  retriever.scores["indices"] = rows[order]
  if "" not in vocab:  # As `index` does: the empty query token, scored nowhere.
    vocab[""] = max(vocab.values()) + 1
  retriever.vocab_dict = vocab
  retriever.unique_token_ids_set = set(vocab.values())
  retriever.nonoccurrence_array = None
  return retriever
