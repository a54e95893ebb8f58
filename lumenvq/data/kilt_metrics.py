"""The KILT metrics, defined exactly as the official KILT scorer defines them.

Reference: facebookresearch/KILT (MIT), `kilt/eval_downstream.py` and
`kilt/eval_retrieval.py`. Numbers must agree with that scorer, so its quirks
are kept on purpose (each one is commented where it happens): ids compare as
stripped strings, an empty guess answer scores 0 but still counts, recall@k
and success_rate@k exist only for k > 1, and a gold output without provenance
is an evidence set that can never be retrieved. Where the official scorer
crashes on malformed input (KeyError, TypeError, `max()` of nothing) this
module refuses with a `KiltScoreError` that names the record instead.

Records are the parsed JSON objects of KILT jsonl files (dicts), as the
official scorer uses them; `lumenvq.kilt_eval` is the command-line front end.
"""

from __future__ import annotations

import collections
import logging
import re
import reprlib
import string
from typing import Any, Iterable, Mapping, Sequence

Record = Mapping[str, Any]

DOWNSTREAM_RANK_KEYS = ("wikipedia_id",)
DEFAULT_KS = (1, 5, 10, 20)

logger = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class KiltScoreError(ValueError):
  """Guess/gold input that the official KILT scorer refuses (or crashes on).

  `role` says which input is at fault ("gold", "guess" or None), so a
  caller can name the file.
  """

  def __init__(self, message: str, role: str | None = None):
    super().__init__(message)
    self.role = role


# ----------------------------------------------------------------------------
# Answer metrics.


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction: str, gold: str) -> float:
  """Token F1 of the normalised strings (0 when nothing is shared, even if both are empty)."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def _sentences(text: str) -> list[list[str]]:
  # The `rouge` package splits on "." and squeezes whitespace *after* dropping
  # empty pieces, so a piece of blanks becomes the sentence "" whose one word
  # is "" (it counts as a word). Words are split on " " only.
  return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> set[str]:
  """Distinct words of the one LCS that `rouge`'s recursive back-tracking reads out.

  Which LCS is read out matters, because ROUGE-L there counts distinct words:
  on a tie the official back-tracking steps along `hyp` (j - 1), not `ref`.
  Iterative here, so long answers do not hit Python's recursion limit.
  """
  n, m = len(ref), len(hyp)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(1, n + 1):
    row, prev = table[i], table[i - 1]
    for j in range(1, m + 1):
      if ref[i - 1] == hyp[j - 1]:
        row[j] = prev[j - 1] + 1
      else:
        row[j] = max(prev[j], row[j - 1])
  words = set()
  i, j = n, m
  while i > 0 and j > 0:
    if ref[i - 1] == hyp[j - 1]:
      words.add(ref[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return words


def rouge_l(prediction: str, gold: str) -> float:
  """ROUGE-L F of the `rouge` package (pltrdy, 1.0.x), which the KILT scorer calls.

  Written by hand because `rouge-score` cannot reproduce it: that package
  lower-cases and keeps only [a-z0-9] tokens, counts tokens with
  multiplicity and computes F = 2PR/(P+R). `rouge` instead does a
  summary-level union LCS over "."-separated sentences, counts *distinct*
  words (the LCS words of every sentence pair are pooled in one set, and
  the lengths are distinct-word counts) and computes F = 2PR/(P+R+1e-8) -
  so an exact match scores 0.999999995, not 1. An empty side (no
  sentences) is the scorer's ValueError, which KILT maps to 0.
  """
  hyp_sents, ref_sents = _sentences(prediction), _sentences(gold)
  if not hyp_sents or not ref_sents:
    return 0.0
  hyp_vocab = {w for s in hyp_sents for w in s}
  ref_vocab = {w for s in ref_sents for w in s}
  union: set[str] = set()
  for ref in ref_sents:
    for hyp in hyp_sents:
      union |= _lcs_words(ref, hyp)
  recall = len(union) / len(ref_vocab)
  precision = len(union) / len(hyp_vocab)
  return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def _max_over_golds(metric, prediction: str, golds: Iterable[str]) -> float:
  return max(metric(prediction, gold) for gold in golds)


# ----------------------------------------------------------------------------
# Record structure and access.


def record_id(record: Record) -> str:
  """The id as the scorer compares it: `str(id).strip()`."""
  return str(record["id"]).strip()


def check_record(record: Any, role: str) -> None:
  """Refuse a record whose structure the official scorer would crash on.

  `role` is "gold" or "guess". Gold answers must be strings (the scorer
  calls `.strip()` on them); a guess answer may be any JSON value (the
  scorer takes `str()` of it).
  """
  if not isinstance(record, dict):
    raise KiltScoreError(f"{role} record is not a JSON object: {reprlib.repr(record)}", role)
  if "id" not in record:
    raise KiltScoreError(f"{role} record has no 'id'", role)
  rid = record_id(record)
  if "output" not in record:
    raise KiltScoreError(f"{role} record id {rid}: no 'output'", role)
  outputs = record["output"]
  if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
    raise KiltScoreError(f"{role} record id {rid}: 'output' must be a list of objects", role)
  for output in outputs:
    answer = output.get("answer")
    if role == "gold" and answer and not isinstance(answer, str):
      raise KiltScoreError(
          f"gold record id {rid}: answer is not a string: {reprlib.repr(answer)}", role
      )
    provenance = output.get("provenance")
    if "provenance" in output and (
        not isinstance(provenance, list) or not all(isinstance(p, dict) for p in provenance)
    ):
      raise KiltScoreError(f"{role} record id {rid}: 'provenance' must be a list of objects", role)


def gold_answers(gold: Record) -> set[str]:
  """Stripped, non-empty answers of a gold record."""
  return {o["answer"].strip() for o in gold["output"] if o.get("answer") and o["answer"].strip()}


def gold_titles(gold: Record) -> set[str]:
  titles = set()
  for output in gold["output"]:
    for prov in output.get("provenance", ()):
      title = prov.get("title")
      if title and not isinstance(title, str):
        raise KiltScoreError(
            f"gold record id {record_id(gold)}: provenance title is not a string", "gold"
        )
      if title and title.strip():
        titles.add(title.strip())
  return titles


def provenance_ids(record: Record, rank_keys: Sequence[str]) -> list[list[str]]:
  """Per output: distinct ids ("+"-joined rank-key values) of provenance that has every key."""
  ids_per_output = []
  for output in record["output"]:
    ids: list[str] = []
    for prov in output.get("provenance", ()):
      if all(key in prov for key in rank_keys):
        pid = "+".join(str(prov[key]).strip() for key in rank_keys)
        if pid not in ids:
          ids.append(pid)
    ids_per_output.append(ids)
  return ids_per_output


def _guess_ids(guess: Record, rank_keys: Sequence[str]) -> list[str]:
  # The scorer ranks the provenance of the first guess output only.
  return provenance_ids(guess, rank_keys)[0]


# ----------------------------------------------------------------------------
# Retrieval metrics.


def rprecision(guess: Record, gold: Record, rank_keys: Sequence[str]) -> float:
  """Best R-precision over the gold outputs (each output's provenance is one gold set)."""
  guess_ids = _guess_ids(guess, rank_keys)
  best = None
  for gold_ids in provenance_ids(gold, rank_keys):
    r = len(gold_ids)
    score = sum(1 for g in guess_ids[:r] if g in gold_ids) / r if r else 0.0
    best = score if best is None else max(best, score)
  if best is None:
    raise KiltScoreError(f"gold record id {record_id(gold)}: 'output' is empty", "gold")
  return best


def evidence_rank(guess: Record, gold: Record, rank_keys: Sequence[str]) -> tuple[list, int]:
  """The scorer's rank: each gold evidence set is one point, placed where its last page is found.

  Returns the rank (True: a completed evidence set, False: a page in no set,
  "evidence_set:i": a partly found set) and the number of distinct gold
  evidence sets (0 when the guess has no usable provenance).
  """
  guess_ids = _guess_ids(guess, rank_keys)
  if not guess_ids:
    return [], 0
  evidence_sets: list[set[str]] = []
  for output in gold["output"]:
    if "provenance" not in output:
      continue
    # Gold provenance missing a key still joins the keys it has, as officially.
    e_set = {
        "+".join(str(prov[k]).strip() for k in rank_keys if k in prov)
        for prov in output["provenance"]
    }
    if e_set not in evidence_sets:
      evidence_sets.append(e_set)
  num_sets = len(evidence_sets)
  rank: list = []
  for guess_id in guess_ids:
    found = False
    # No break: a page in several evidence sets adds a point for each, officially.
    for idx, e_set in enumerate(evidence_sets):
      if guess_id in e_set:
        found = True
        point = f"evidence_set:{idx}"
        if point in rank:
          rank.remove(point)
        e_set.remove(guess_id)
        rank.append(True if not e_set else point)
    if not found:
      rank.append(False)
  return rank, num_sets


def precision_at_k(rank: Sequence, k: int) -> float:
  return list(rank[:k]).count(True) / k


def recall_at_k(rank: Sequence, num_evidence_sets: int, k: int) -> float:
  return list(rank[:k]).count(True) / num_evidence_sets


def success_rate_at_k(rank: Sequence, k: int) -> float:
  return float(True in list(rank[:k]))


def _context_texts(guess: Record, k: int) -> list[str]:
  texts = []
  for prov in guess["output"][0].get("provenance", ())[:k]:
    if "text" in prov:
      if not isinstance(prov["text"], str):
        raise KiltScoreError(
            f"guess record id {record_id(guess)}: provenance text is not a string", "guess"
        )
      texts.append(normalize_answer(prov["text"]))
  return texts


def _any_in(needles: Iterable[str], texts: Sequence[str]) -> bool:
  normalized = [normalize_answer(n) for n in needles]
  return any(n in text for text in texts for n in normalized)


def _answer_and_entity_in_context(guess: Record, gold: Record, k: int) -> bool:
  answers, titles = gold_answers(gold), gold_titles(gold)
  return any(
      _any_in(answers, [text]) and _any_in(titles, [text]) for text in _context_texts(guess, k)
  )


# ----------------------------------------------------------------------------
# Whole-file evaluation.


def align(gold_records: Sequence[Record], guess_records: Sequence[Record]) -> tuple[list, list]:
  """The scorer's input check: unique ids, a guess for every gold id, guesses put in gold order.

  Guesses for ids not in gold are ignored after a warning, as officially.
  """
  for role, records in (("gold", gold_records), ("guess", guess_records)):
    for index, record in enumerate(records):
      try:
        check_record(record, role)
      except KiltScoreError as err:
        raise KiltScoreError(f"record {index + 1}: {err}", role) from None
  if len(gold_records) != len(guess_records):
    logger.warning("different size gold: %d guess: %d", len(gold_records), len(guess_records))
  gold_ids = set()
  for gold in gold_records:
    if record_id(gold) in gold_ids:
      raise KiltScoreError(f"gold ids must be unique: id {record_id(gold)} repeats", "gold")
    gold_ids.add(record_id(gold))
  by_id: dict[str, Record] = {}
  for guess in guess_records:
    if record_id(guess) in by_id:
      raise KiltScoreError(f"prediction ids must be unique: id {record_id(guess)} repeats", "guess")
    by_id[record_id(guess)] = guess
  aligned = []
  for gold in gold_records:
    if record_id(gold) not in by_id:
      raise KiltScoreError(f"no prediction provided for id: {record_id(gold)}", "guess")
    aligned.append(by_id[record_id(gold)])
  return list(gold_records), aligned


def _single_answer(guess: Record) -> str:
  outputs = guess["output"]
  if len(outputs) != 1 or "answer" not in outputs[0]:
    what = "no 'answer'" if len(outputs) == 1 else f"{len(outputs)} outputs"
    raise KiltScoreError(
        f"you should provide exactly one valid answer for id {record_id(guess)} (found {what})",
        "guess",
    )
  return str(outputs[0]["answer"]).strip()


def evaluate_downstream(gold_records: Sequence[Record], guess_records: Sequence[Record]) -> dict:
  """The official downstream report: {"kilt", "downstream", "retrieval"} for a guess/gold pair."""
  gold_records, guess_records = align(gold_records, guess_records)
  names = ("accuracy", "em", "f1", "rougel")
  down = dict.fromkeys(names, 0.0)
  kilt = dict.fromkeys(names, 0.0)
  for gold, guess in zip(gold_records, guess_records):
    answer = _single_answer(guess)
    if not answer:
      continue  # the scorer counts an empty answer as a record that scores 0
    candidates = gold_answers(gold)
    if not candidates:
      raise KiltScoreError(
          f"gold record id {record_id(gold)} has no answer to score against", "gold"
      )
    local = {
        "accuracy": float(answer in candidates),
        "em": _max_over_golds(lambda p, g: float(exact_match(p, g)), answer, candidates),
        "f1": _max_over_golds(f1_score, answer, candidates),
        "rougel": _max_over_golds(rouge_l, answer, candidates),
    }
    page_rprec = rprecision(guess, gold, DOWNSTREAM_RANK_KEYS)
    for name in names:
      down[name] += local[name]
      if page_rprec == 1:
        kilt[name] += local[name]
  total = len(gold_records)
  if total:
    down = {name: value / total for name, value in down.items()}
    kilt = {name: value / total for name, value in kilt.items()}
  retrieval = retrieval_scores(gold_records, guess_records, (1, 5), DOWNSTREAM_RANK_KEYS)
  return {
      "kilt": {f"KILT-{name}": kilt[name] for name in names},
      "downstream": down,
      "retrieval": {"Rprec": retrieval["Rprec"], "recall@5": retrieval["recall@5"]},
  }


def _check_ks_and_keys(ks: Sequence[int], rank_keys: Sequence[str]) -> list[int]:
  ks = sorted(int(k) for k in ks)
  if not ks or ks[0] <= 0:
    raise KiltScoreError(f"ks must be positive integers, got {ks}")
  if len(set(ks)) != len(ks):
    # The official scorer adds a repeated k twice and divides twice: refuse instead.
    raise KiltScoreError(f"ks must not repeat, got {ks}")
  if not rank_keys or not all(isinstance(key, str) and key for key in rank_keys):
    raise KiltScoreError(f"rank_keys must be non-empty names, got {list(rank_keys)}")
  return ks


def retrieval_scores(
    gold_records: Sequence[Record],
    guess_records: Sequence[Record],
    ks: Sequence[int],
    rank_keys: Sequence[str],
    with_context: bool = False,
) -> dict:
  """Rprec, precision@k (k >= 1), recall@k and success_rate@k (k > 1) over aligned records.

  With `with_context`, also the scorer's answer/entity-in-context@k and
  entity_in_input (None unless every gold record has a string 'input').
  """
  ks = _check_ks_and_keys(ks, rank_keys)
  keys = ["Rprec"] + (["entity_in_input"] if with_context else [])
  for k in ks:
    keys.append(f"precision@{k}")
    if with_context:
      keys += [
          f"answer_in_context@{k}",
          f"answer_and_ent_in_context@{k}",
          f"entity_in_context@{k}",
      ]
    if k > 1:  # officially there is no recall@1 or success_rate@1
      keys += [f"recall@{k}", f"success_rate@{k}"]
  result = dict.fromkeys(keys, 0.0)
  has_input = all(isinstance(gold.get("input"), str) for gold in gold_records)
  for gold, guess in zip(gold_records, guess_records, strict=True):
    if len(guess["output"]) != 1:
      raise KiltScoreError(
          f"guess should provide exactly one output for id {record_id(guess)}", "guess"
      )
    result["Rprec"] += rprecision(guess, gold, rank_keys)
    rank, num_sets = evidence_rank(guess, gold, rank_keys)
    if with_context and has_input:
      result["entity_in_input"] += float(
          _any_in(gold_titles(gold), [normalize_answer(gold["input"])])
      )
    for k in ks:
      if num_sets:
        result[f"precision@{k}"] += precision_at_k(rank, k)
        if k > 1:
          result[f"recall@{k}"] += recall_at_k(rank, num_sets, k)
          result[f"success_rate@{k}"] += success_rate_at_k(rank, k)
      if with_context:
        texts = _context_texts(guess, k)
        result[f"answer_in_context@{k}"] += float(_any_in(gold_answers(gold), texts))
        result[f"answer_and_ent_in_context@{k}"] += float(
            _answer_and_entity_in_context(guess, gold, k)
        )
        result[f"entity_in_context@{k}"] += float(_any_in(gold_titles(gold), texts))
  if gold_records:
    result = {key: value / len(gold_records) for key, value in result.items()}
  if with_context and not has_input:
    logger.warning("entity_in_input needs a string 'input' in every gold record: reported as null")
    result["entity_in_input"] = None
  return result


def evaluate_retrieval(
    gold_records: Sequence[Record],
    guess_records: Sequence[Record],
    ks: Sequence[int] = DEFAULT_KS,
    rank_keys: Sequence[str] = DOWNSTREAM_RANK_KEYS,
) -> dict:
  """The official retrieval report (eval_retrieval.py): align, keep the provenance output."""
  _check_ks_and_keys(ks, rank_keys)
  gold_records, guess_records = align(gold_records, guess_records)
  filtered = []
  for guess in guess_records:
    outputs = [o for o in guess["output"] if "provenance" in o]
    if len(outputs) != 1:
      raise KiltScoreError(
          f"guess should provide exactly one output with provenance for id "
          f"{record_id(guess)} (found {len(outputs)})",
          "guess",
      )
    filtered.append({**guess, "output": outputs})
  return retrieval_scores(gold_records, filtered, ks, rank_keys, with_context=True)
