"""bm25_build against bm25s's own index of the same token ids."""

import bm25s
import numpy as np
import pytest
from bm25s.tokenization import Tokenized

from lumenvq.data import bm25_build, retrieve

SETTINGS = retrieve.TOKENIZER_SETTINGS["bm25"]


def _corpus(num_docs, seed=0):
  """Zipf-distributed words, documents of 0 to 60 words (an empty one included)."""
  rng = np.random.default_rng(seed)
  words = [f"w{i}x" for i in range(3000)]
  lengths = rng.integers(0, 60, num_docs)
  lengths[3] = 0
  return [" ".join(words[min(z, 2999)] for z in rng.zipf(1.3, n)) for n in lengths]


@pytest.mark.parametrize("num_docs,run", [(50, 1 << 16), (3000, 700)])
def test_scores_and_vocabulary_equal_bm25s_index(num_docs, run, monkeypatch):
  monkeypatch.setattr(bm25_build, "RUN_DOCUMENTS", run)  # Several runs of documents.
  tokenizer = retrieve.make_tokenizer()
  ids = list(tokenizer.streaming_tokenize(_corpus(num_docs), update_vocab=True))
  reference = bm25s.BM25(**SETTINGS)
  reference.index(Tokenized(ids=ids, vocab=tokenizer.get_vocab_dict()), show_progress=False)
  built = bm25_build.build(iter(ids), tokenizer.get_vocab_dict, **SETTINGS)
  assert built.scores["num_docs"] == num_docs
  for key in ("data", "indices", "indptr"):
    assert built.scores[key].dtype == reference.scores[key].dtype, key
    np.testing.assert_array_equal(built.scores[key], reference.scores[key], err_msg=key)
  assert built.vocab_dict == reference.vocab_dict
  queries = tokenizer.tokenize(_corpus(20, seed=1), update_vocab=False, show_progress=False)
  for index in (built, reference):
    index.backend = "numpy"
  got = built.retrieve(queries, k=10, show_progress=False)
  want = reference.retrieve(queries, k=10, show_progress=False)
  np.testing.assert_array_equal(got[1], want[1])


def test_a_variant_other_than_lucene_is_refused():
  with pytest.raises(ValueError, match="method='bm25l'"):
    bm25_build.build(iter([[0]]), lambda: {"a": 0}, method="bm25l")
