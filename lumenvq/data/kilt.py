"""KILT tasks and readers: the task registry, streaming readers for KILT jsonl
files and the knowledge source, and the TriviaQA question restore step.

File names, splits and the knowledge-source record layout follow the
official KILT README (facebookresearch/KILT). Readers stream one line at a
time (the knowledge source is 35 GiB) and stop at the first bad line with a
`KiltFormatError` naming `file:line` and the reason, or, with
`skip_bad_lines=True`, count bad lines and log a warning when done.

    python -m lumenvq.data.kilt restore_triviaqa --kilt_file triviaqa-dev_id-kilt.jsonl \
        --triviaqa_files triviaqa-rc/qa/wikipedia-dev.json \
        --out triviaqa-dev-kilt.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import reprlib
from typing import Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

from lumenvq import paths

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
KNOWLEDGE_SOURCE_FILE = "kilt_knowledgesource.json"
KINDS = ("fact_check", "entity_linking", "slot_filling", "qa", "long_qa", "dialogue")
_MAX_REPORTED = 10  # bad lines whose messages a skipping reader keeps
_REPR = reprlib.Repr()  # bounded, so a huge or deeply nested value cannot break an error message
_REPR.maxstring = _REPR.maxother = 60


class KiltFormatError(ValueError):
  """A line of a KILT file that is not a valid record; the message starts with `file:line`."""

  def __init__(self, path: str, line: int, reason: str):
    super().__init__(f"{path}:{line}: {reason}")
    self.path, self.line, self.reason = path, line, reason


class UnknownTaskError(ValueError):
  """A task name that is not in the registry; the message lists the known ones."""


# ----------------------------------------------------------------------------
# Task registry.


@dataclasses.dataclass(frozen=True)
class KiltTask:
  """One KILT dataset: its files, what kind of task it is and how it is scored.

  `files` are the names the readers read; `download_files` the names on the
  KILT server (they differ only for TriviaQA, shipped without questions).
  `metrics` and `kilt_metrics` are keys of the scorer's report
  (`lumenvq.data.kilt_metrics`), the leaderboard's headline metric first.
  """

  name: str
  dataset: str
  kind: str
  files: Mapping[str, str]
  metrics: tuple[str, ...]
  kilt_metrics: tuple[str, ...]
  input_prefix: str
  download_files: Mapping[str, str] | None = None

  def file(self, split: str) -> str:
    """File name of `split`, or an error naming the task's splits."""
    if split not in self.files:
      raise ValueError(f"KILT task {self.name} has no split {split!r}; it has {sorted(self.files)}")
    return self.files[split]

  def download_file(self, split: str) -> str:
    self.file(split)
    return (self.download_files or self.files)[split]


def _files(prefix: str, splits: Sequence[str] = SPLITS) -> dict[str, str]:
  names = {split: f"{prefix}-{split}-kilt.jsonl" for split in splits if split != "test"}
  if "test" in splits:
    names["test"] = f"{prefix}-test_without_answers-kilt.jsonl"
  return names


def _task(name, dataset, kind, metrics, prefix, files=None, download_files=None) -> KiltTask:
  return KiltTask(
      name=name,
      dataset=dataset,
      kind=kind,
      files=files or _files(name),
      metrics=metrics,
      kilt_metrics=tuple(f"KILT-{m}" for m in metrics),
      input_prefix=prefix,
      download_files=download_files,
  )


_ACC, _ACC_F1, _EM_F1 = ("accuracy",), ("accuracy", "f1"), ("em", "f1")
TASKS: dict[str, KiltTask] = {
    t.name: t
    for t in (
        _task("fever", "FEVER", "fact_check", _ACC, "claim: "),
        _task("aidayago2", "AIDA CoNLL-YAGO", "entity_linking", _ACC, "entity: "),
        _task(
            "wned", "WNED-WIKI", "entity_linking", _ACC, "entity: ", _files("wned", ("dev", "test"))
        ),
        _task(
            "cweb", "WNED-CWEB", "entity_linking", _ACC, "entity: ", _files("cweb", ("dev", "test"))
        ),
        _task("trex", "T-REx", "slot_filling", _ACC_F1, "relation: "),
        _task("structured_zeroshot", "Zero-Shot RE", "slot_filling", _ACC_F1, "relation: "),
        _task("nq", "Natural Questions", "qa", _EM_F1, "question: "),
        _task("hotpotqa", "HotpotQA", "qa", _EM_F1, "question: "),
        # KILT ships TriviaQA as ids only; restore_triviaqa writes the files the readers read.
        _task(
            "triviaqa",
            "TriviaQA",
            "qa",
            _EM_F1,
            "question: ",
            download_files={
                "train": "triviaqa-train_id-kilt.jsonl",
                "dev": "triviaqa-dev_id-kilt.jsonl",
                "test": "triviaqa-test_id_without_answers-kilt.jsonl",
            },
        ),
        _task("eli5", "ELI5", "long_qa", ("rougel", "f1"), "question: "),
        _task("wow", "Wizard of Wikipedia", "dialogue", ("f1", "rougel"), "dialogue: "),
    )
}


def get_task(name: str) -> KiltTask:
  if name not in TASKS:
    raise UnknownTaskError(f"unknown KILT task {name!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[name]


# ----------------------------------------------------------------------------
# Records.


@dataclasses.dataclass(frozen=True)
class Provenance:
  """One piece of evidence: a Wikipedia page, optionally narrowed to paragraphs/characters."""

  wikipedia_id: str
  title: str | None = None
  section: str | None = None
  start_paragraph_id: int | None = None
  end_paragraph_id: int | None = None
  start_character: int | None = None
  end_character: int | None = None
  bleu_score: float | None = None


@dataclasses.dataclass(frozen=True)
class KiltRecord:
  """A KILT example. `answers`: stripped, distinct, in file order (empty in test files);
  `provenance`: every output's evidence, flattened, exact repeats dropped."""

  id: str
  input: str
  answers: tuple[str, ...]
  provenance: tuple[Provenance, ...]
  meta: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class KnowledgePage:
  """A knowledge-source page; `paragraphs[0]` is the title line, as shipped."""

  wikipedia_id: str
  title: str
  paragraphs: tuple[str, ...]
  anchors: tuple[Mapping[str, Any], ...]
  categories: str
  history: Mapping[str, Any]
  wikidata_info: Mapping[str, Any]


class BadLine(Exception):
  """Why `parse_kilt_record` / `parse_knowledge_page` reject a line; readers add file and line.

  Public so that readers elsewhere (such as `passages.iter_pages`, which
  reads byte ranges of the knowledge source) turn it into `KiltFormatError`.
  """


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _id_string(value: Any, what: str) -> str:
  if not (_is_int(value) or isinstance(value, str)) or not str(value).strip():
    raise BadLine(f"{what} must be a non-empty string or integer, got {_REPR.repr(value)}")
  return str(value).strip()


def _optional(obj: Mapping, key: str, check: Callable[[Any], bool], what: str, where: str) -> Any:
  value = obj.get(key)
  if value is not None and not check(value):
    raise BadLine(f"{where}: '{key}' must be {what}, got {_REPR.repr(value)}")
  return value


def _paragraph_id(obj: Mapping, key: str, where: str) -> int | None:
  # Integers in the KILT files; the scorer's own test data also writes "5".
  value = obj.get(key)
  if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value):
    return int(value)
  return _optional(obj, key, _is_int, "an integer", where)


def _provenance(obj: Any, where: str) -> Provenance:
  if not isinstance(obj, dict):
    raise BadLine(f"{where} is not an object")
  if "wikipedia_id" not in obj:
    raise BadLine(f"{where} has no 'wikipedia_id'")
  number = lambda v: (_is_int(v) or isinstance(v, float))  # noqa: E731
  return Provenance(
      wikipedia_id=_id_string(obj["wikipedia_id"], f"{where} wikipedia_id"),
      title=_optional(obj, "title", lambda v: isinstance(v, str), "a string", where),
      section=_optional(obj, "section", lambda v: isinstance(v, str), "a string", where),
      start_paragraph_id=_paragraph_id(obj, "start_paragraph_id", where),
      end_paragraph_id=_paragraph_id(obj, "end_paragraph_id", where),
      start_character=_optional(obj, "start_character", _is_int, "an integer", where),
      end_character=_optional(obj, "end_character", _is_int, "an integer", where),
      bleu_score=_optional(obj, "bleu_score", number, "a number", where),
  )


def parse_kilt_record(obj: Any, require_answers: bool = False) -> KiltRecord:
  """Validate one decoded KILT line; raises `BadLine` with the reason."""
  if not isinstance(obj, dict):
    raise BadLine(f"a record must be a JSON object, got {type(obj).__name__}")
  if "id" not in obj:
    raise BadLine("record has no 'id'")
  rid = _id_string(obj["id"], "'id'")
  text = obj.get("input")
  if not isinstance(text, str) or not text.strip():
    hint = (
        " (TriviaQA files ship ids only: run restore_triviaqa first)" if text in (None, "") else ""
    )
    raise BadLine(f"id {rid}: 'input' must be a non-empty string, got {_REPR.repr(text)}{hint}")
  meta = obj.get("meta")
  if meta is not None and not isinstance(meta, dict):
    raise BadLine(f"id {rid}: 'meta' must be an object")
  outputs = obj.get("output")
  if outputs is None:
    outputs = []
  if not isinstance(outputs, list):
    raise BadLine(f"id {rid}: 'output' must be a list")
  answers: list[str] = []
  provenance: list[Provenance] = []
  for i, output in enumerate(outputs):
    where = f"id {rid}: output {i}"
    if not isinstance(output, dict):
      raise BadLine(f"{where} is not an object")
    answer = _optional(output, "answer", lambda v: isinstance(v, str), "a string", where)
    if answer and answer.strip() and answer.strip() not in answers:
      answers.append(answer.strip())
    provs = output.get("provenance")
    if provs is not None and not isinstance(provs, list):
      raise BadLine(f"{where}: 'provenance' must be a list")
    for j, prov in enumerate(provs or ()):
      item = _provenance(prov, f"{where} provenance {j}")
      if item not in provenance:
        provenance.append(item)
  if require_answers and not answers:
    raise BadLine(f"id {rid}: no answer in 'output'")
  return KiltRecord(rid, text, tuple(answers), tuple(provenance), meta or {})


def parse_knowledge_page(obj: Any) -> KnowledgePage:
  """Validate one decoded knowledge-source line; a page must have text."""
  if not isinstance(obj, dict):
    raise BadLine(f"a page must be a JSON object, got {type(obj).__name__}")
  if "wikipedia_id" not in obj:
    raise BadLine("page has no 'wikipedia_id'")
  wid = _id_string(obj["wikipedia_id"], "'wikipedia_id'")
  where = f"page {wid}"
  title = obj.get("wikipedia_title")
  if not isinstance(title, str):
    raise BadLine(f"{where}: 'wikipedia_title' must be a string, got {_REPR.repr(title)}")
  text = obj.get("text")
  if not isinstance(text, list) or not text:
    raise BadLine(f"{where} has no text ('text' must be a non-empty list of paragraphs)")
  if not all(isinstance(p, str) for p in text):
    raise BadLine(f"{where}: every paragraph of 'text' must be a string")
  anchors = _optional(
      obj,
      "anchors",
      lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v),
      "a list of objects",
      where,
  )
  categories = _optional(obj, "categories", lambda v: isinstance(v, str), "a string", where)
  history = _optional(obj, "history", lambda v: isinstance(v, dict), "an object", where)
  wikidata = _optional(obj, "wikidata_info", lambda v: isinstance(v, dict), "an object", where)
  return KnowledgePage(
      wid,
      title,
      tuple(text),
      tuple(anchors or ()),
      categories or "",
      history or {},
      wikidata or {},
  )


# ----------------------------------------------------------------------------
# Streaming.


def _decode(raw: bytes, line: int) -> Any:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise BadLine(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
  if line == 1:
    text = text.removeprefix("\ufeff")
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
    raise BadLine(f"not valid JSON ({str(err)[:120]})") from None


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, bytes) of the non-blank lines, read in binary so bad UTF-8 is per line."""
  with paths.path(path).open("rb") as f:
    for number, raw in enumerate(f, start=1):
      if raw.strip():
        yield number, raw


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, decoded JSON value) per line; `KiltFormatError` on a line that is not JSON."""
  for number, raw in _lines(path):
    try:
      value = _decode(raw, number)
    except BadLine as err:
      raise KiltFormatError(str(path), number, str(err)) from None
    yield number, value


T = TypeVar("T")


class JsonlReader(Generic[T]):
  """Iterable over the valid records of one jsonl file, streamed.

  After (or during) iteration `num_skipped` counts the lines skipped under
  `skip_bad_lines`, and `skipped` keeps the first messages (`file:line: why`).
  """

  def __init__(
      self, path: str | os.PathLike, parse: Callable[[Any], T], skip_bad_lines: bool = False
  ):
    self.path, self._parse, self.skip_bad_lines = os.fspath(path), parse, skip_bad_lines
    self.num_skipped = 0
    self.skipped: list[str] = []

  def __iter__(self) -> Iterator[T]:
    self.num_skipped, self.skipped = 0, []
    for number, raw in _lines(self.path):
      try:
        record = self._parse(_decode(raw, number))
      except BadLine as err:
        error = KiltFormatError(self.path, number, str(err))
        if not self.skip_bad_lines:
          raise error from None
        self.num_skipped += 1
        if len(self.skipped) < _MAX_REPORTED:
          self.skipped.append(str(error))
        continue
      yield record
    if self.num_skipped:
      logger.warning(
          "skipped %d bad line(s) of %s; first: %s",
          self.num_skipped,
          self.path,
          self.skipped[0],
      )


def read_kilt(
    path: str | os.PathLike, skip_bad_lines: bool = False, require_answers: bool = False
) -> JsonlReader[KiltRecord]:
  """Stream the `KiltRecord`s of a KILT jsonl file (`require_answers` for train/dev)."""
  return JsonlReader(path, lambda obj: parse_kilt_record(obj, require_answers), skip_bad_lines)


def read_knowledge_source(
    path: str | os.PathLike, skip_bad_lines: bool = False
) -> JsonlReader[KnowledgePage]:
  """Stream the `KnowledgePage`s of `kilt_knowledgesource.json` (one page per line)."""
  return JsonlReader(path, parse_knowledge_page, skip_bad_lines)


# ----------------------------------------------------------------------------
# TriviaQA.


def _triviaqa_questions(files: Sequence[str]) -> dict[str, str]:
  """QuestionId -> Question over the users' TriviaQA json files (`{"Data": [...]}`)."""
  questions: dict[str, str] = {}
  origin: dict[str, str] = {}
  for path in files:
    # One JSON document, not jsonl: it is read whole (no streaming JSON parser in the env).
    try:
      with paths.path(path).open("rb") as f:
        data = json.load(f)
    except (ValueError, RecursionError) as err:
      raise ValueError(f"{path}: not a TriviaQA json file ({str(err)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
      raise ValueError(f"{path}: a TriviaQA file is an object with a 'Data' list")
    for i, item in enumerate(data["Data"]):
      if not (
          isinstance(item, dict)
          and isinstance(item.get("QuestionId"), str)
          and isinstance(item.get("Question"), str)
      ):
        raise ValueError(f"{path}: Data[{i}] needs string 'QuestionId' and 'Question'")
      qid = item["QuestionId"]
      if qid in questions and questions[qid] != item["Question"]:
        raise ValueError(f"{path}: QuestionId {qid} also in {origin[qid]} with another question")
      questions[qid], origin[qid] = item["Question"], path
  return questions


def restore_triviaqa_questions(
    kilt_path: str, triviaqa_json_paths: Sequence[str], out_path: str
) -> int:
  """Fill the `input` of KILT's TriviaQA id-only file from TriviaQA's own files.

  KILT cannot redistribute TriviaQA questions, so its files carry ids only
  (see KILT's scripts/get_triviaqa_input.py). Writes `out_path` (local or gs://) whole
  once every record is filled and valid (`paths.atomic_open`), never partly; returns
  the number of records. A KILT id missing from the TriviaQA files is an error.
  """
  questions = _triviaqa_questions(triviaqa_json_paths)
  count = 0
  with paths.atomic_open(out_path, "w") as out:
    for number, obj in iter_jsonl(kilt_path):
      if not isinstance(obj, dict) or "id" not in obj:
        raise KiltFormatError(kilt_path, number, "record has no 'id'")
      qid = str(obj["id"]).strip()
      if qid not in questions:
        raise KiltFormatError(
            kilt_path,
            number,
            f"id {qid} is in none of the TriviaQA files " f"{', '.join(triviaqa_json_paths)}",
        )
      obj["input"] = questions[qid]
      try:
        parse_kilt_record(obj)
      except BadLine as err:
        raise KiltFormatError(kilt_path, number, str(err)) from None
      out.write(json.dumps(obj) + "\n")
      count += 1
  return count


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.kilt", description=__doc__.split("\n\n")[0]
  )
  commands = parser.add_subparsers(dest="command", required=True)
  restore = commands.add_parser(
      "restore_triviaqa", help="fill TriviaQA questions into KILT's id-only file"
  )
  restore.add_argument("--kilt_file", required=True, help="e.g. triviaqa-dev_id-kilt.jsonl")
  restore.add_argument(
      "--triviaqa_files",
      required=True,
      help="comma-separated TriviaQA json files, e.g. qa/wikipedia-dev.json",
  )
  restore.add_argument("--out", required=True, help="e.g. triviaqa-dev-kilt.jsonl")
  args = parser.parse_args(argv)
  try:
    count = restore_triviaqa_questions(
        args.kilt_file, [p for p in args.triviaqa_files.split(",") if p], args.out
    )
  except (OSError, ValueError) as err:
    parser.exit(1, f"error: {err}\n")
  print(f"wrote {count} records to {args.out}")


if __name__ == "__main__":
  main()
