"""Score KILT predictions like the official KILT scorer; prints the report as JSON.

    python -m lumenvq.kilt_eval GUESS.jsonl GOLD.jsonl
        {"kilt": {"KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel"},
         "downstream": {"accuracy", "em", "f1", "rougel"},
         "retrieval": {"Rprec", "recall@5"}}          (kilt/eval_downstream.py)
    python -m lumenvq.kilt_eval GUESS.jsonl GOLD.jsonl --retrieval --ks 1,5 \
        --rank_keys wikipedia_id,section
        {"Rprec", "entity_in_input", "precision@k", "answer_in_context@k", ...,
         "recall@k", "success_rate@k" (k > 1)}        (kilt/eval_retrieval.py)

Input the official scorer refuses is refused here too, with an error naming
the file and line or record id (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from lumenvq.data import kilt as kilt_data
from lumenvq.data import kilt_metrics


def load_records(path: str, role: str) -> list[dict]:
  """All records of a jsonl file (scoring aligns by id, so needs them all), structure-checked."""
  records = []
  for number, record in kilt_data.iter_jsonl(path):
    try:
      kilt_metrics.check_record(record, role)
    except kilt_metrics.KiltScoreError as err:
      raise kilt_metrics.KiltScoreError(
          f"{path}:{number}: {err}"
      ) from None  # names the file: no role
    records.append(record)
  return records


def _int_list(text: str) -> list[int]:
  try:
    return [int(k) for k in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ks wants comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.kilt_eval", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("guess", help="predictions, KILT jsonl")
  parser.add_argument("gold", help="gold KILT jsonl")
  parser.add_argument("--retrieval", action="store_true", help="print the retrieval report instead")
  parser.add_argument(
      "--ks",
      type=_int_list,
      default=list(kilt_metrics.DEFAULT_KS),
      help="retrieval: comma-separated k of precision@k / recall@k (default 1,5,10,20)",
  )
  parser.add_argument(
      "--rank_keys",
      default=",".join(kilt_metrics.DOWNSTREAM_RANK_KEYS),
      help="retrieval: comma-separated provenance keys that identify a hit, e.g. "
      "wikipedia_id,section or wikipedia_id,start_paragraph_id,end_paragraph_id",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    gold = load_records(args.gold, "gold")
    guess = load_records(args.guess, "guess")
    if args.retrieval:
      report = kilt_metrics.evaluate_retrieval(gold, guess, args.ks, args.rank_keys.split(","))
    else:
      report = kilt_metrics.evaluate_downstream(gold, guess)
  except (OSError, ValueError) as err:  # KiltScoreError and KiltFormatError are ValueErrors
    path = {"gold": args.gold, "guess": args.guess}.get(getattr(err, "role", None))
    print(f"error: {path}: {err}" if path else f"error: {err}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
