"""Train a T5-style SentencePiece vocabulary on the knowledge source (see `vocab`).

    python -m lumenvq.data.train_vocab --knowledge_source kilt_knowledgesource.json --out DIR/spm \
        [--vocab_size 8000] [--max_sentences 2000000] [--model_type bpe] \
        [--kilt_files nq-train-kilt.jsonl,...] [--character_coverage 1.0]
"""

from __future__ import annotations

import argparse
from typing import Sequence

from lumenvq.data import kilt, vocab


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.train_vocab", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--knowledge_source", required=True, help="kilt_knowledgesource.json")
  parser.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument(
      "--max_sentences",
      type=int,
      default=2_000_000,
      help="sample size, spread over the file; 0 reads every sentence",
  )
  parser.add_argument("--character_coverage", type=float, default=0.9995)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument(
      "--model_type",
      choices=("unigram", "bpe"),
      default="unigram",
      help="T5 uses unigram; bpe keeps whole names as one piece on small corpora",
  )
  parser.add_argument(
      "--kilt_files",
      default="",
      help="comma-separated KILT task files (train splits) whose questions and answers "
      "are trained on too",
  )
  parser.add_argument("--skip_bad_lines", action="store_true")
  args = parser.parse_args(argv)
  try:
    model = vocab.train_sentencepiece(
        args.knowledge_source,
        args.out,
        args.vocab_size,
        args.max_sentences or None,
        args.character_coverage,
        args.threads,
        args.skip_bad_lines,
        args.model_type,
        [f for f in args.kilt_files.split(",") if f],
    )
  except (
      OSError,
      ValueError,
      RuntimeError,
      kilt.KiltFormatError,
  ) as err:  # spm reports bad settings as RuntimeError
    parser.exit(1, f"error: {err}\n")
  print(model)


if __name__ == "__main__":
  main()
