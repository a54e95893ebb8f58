"""KILT task registry, streaming readers (valid, malformed, garbage lines), TriviaQA restore."""

import json
import logging
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lumenvq.data import kilt, kilt_metrics

NQ_LINE = {
    "id": "-4471",
    "input": "who sang hey jude",
    "output": [
        {
            "answer": " The Beatles ",
            "provenance": [
                {
                    "wikipedia_id": "64",
                    "title": "Hey Jude",
                    "start_paragraph_id": 1,
                    "end_paragraph_id": "2",
                    "start_character": 0,
                    "end_character": 11,
                    "bleu_score": 1.0,
                    "section": "Section::::Abstract.",
                }
            ],
        },
        {"answer": "The Beatles"},
        {
            "provenance": [
                {
                    "wikipedia_id": 64,
                    "title": "Hey Jude",
                    "start_paragraph_id": 1,
                    "end_paragraph_id": 2,
                    "start_character": 0,
                    "end_character": 11,
                    "bleu_score": 1,
                    "section": "Section::::Abstract.",
                },
                {"wikipedia_id": "99"},
            ]
        },
    ],
    "meta": {"annotation_id": 7},
}
PAGE = {
    "_id": "64",
    "wikipedia_id": "64",
    "wikipedia_title": "Hey Jude",
    "text": ["Hey Jude\n", "Hey Jude is a song.\n"],
    "anchors": [{"text": "song", "href": "Song", "paragraph_id": 1, "start": 14, "end": 18}],
    "categories": "1968 songs",
    "history": {"url": "https://en.wikipedia.org/w/index.php?title=Hey_Jude"},
    "wikidata_info": {"wikidata_id": "Q202"},
}


def write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
  return str(path)


# ---------------------------------------------------------------- registry


def test_registry_names_files_and_metrics():
  assert list(kilt.TASKS) == [
      "fever",
      "aidayago2",
      "wned",
      "cweb",
      "trex",
      "structured_zeroshot",
      "nq",
      "hotpotqa",
      "triviaqa",
      "eli5",
      "wow",
  ]
  assert kilt.get_task("fever").file("train") == "fever-train-kilt.jsonl"
  assert (
      kilt.get_task("structured_zeroshot").file("test")
      == "structured_zeroshot-test_without_answers-kilt.jsonl"
  )
  assert kilt.get_task("wned").files == {
      "dev": "wned-dev-kilt.jsonl",
      "test": "wned-test_without_answers-kilt.jsonl",
  }
  with pytest.raises(ValueError, match=r"cweb has no split 'train'; it has \['dev', 'test'\]"):
    kilt.get_task("cweb").file("train")
  trivia = kilt.get_task("triviaqa")
  assert trivia.file("dev") == "triviaqa-dev-kilt.jsonl"
  assert trivia.download_file("dev") == "triviaqa-dev_id-kilt.jsonl"
  assert trivia.download_file("test") == "triviaqa-test_id_without_answers-kilt.jsonl"
  assert kilt.get_task("nq").download_file("dev") == "nq-dev-kilt.jsonl"
  report_keys = {"accuracy", "em", "f1", "rougel"}
  for task in kilt.TASKS.values():
    assert task.kind in kilt.KINDS and task.input_prefix.endswith(": ")
    assert set(task.metrics) <= report_keys
    assert task.kilt_metrics == tuple(f"KILT-{m}" for m in task.metrics)
  assert (
      kilt.get_task("fever").metrics == ("accuracy",)
      and kilt.get_task("eli5").metrics[0] == "rougel"
  )


def test_unknown_task_lists_known_ones():
  with pytest.raises(
      kilt.UnknownTaskError, match="unknown KILT task 'zsre'; known tasks: fever, aidayago2"
  ):
    kilt.get_task("zsre")


# ---------------------------------------------------------------- read_kilt


def test_read_kilt_record_fields(tmp_path):
  test_line = {"id": 5, "input": "claim text"}  # test files carry no output
  path = write_lines(tmp_path / "nq.jsonl", [NQ_LINE, b"\n", test_line])
  records = list(kilt.read_kilt(path))
  assert len(records) == 2
  first = records[0]
  assert (
      first.id == "-4471"
      and first.input == "who sang hey jude"
      and first.meta == {"annotation_id": 7}
  )
  assert first.answers == ("The Beatles",)
  assert [p.wikipedia_id for p in first.provenance] == [
      "64",
      "99",
  ]  # the repeat of page 64 dropped
  assert first.provenance[0] == kilt.Provenance(
      "64", "Hey Jude", "Section::::Abstract.", 1, 2, 0, 11, 1.0
  )
  assert records[1] == kilt.KiltRecord("5", "claim text", (), (), {})
  with pytest.raises(kilt.KiltFormatError, match=r":3: id 5: no answer"):
    list(kilt.read_kilt(path, require_answers=True))


@pytest.mark.parametrize(
    "line,reason",
    [
        (b"{not json}\n", "not valid JSON"),
        (b'{"id": "\xff"}\n', "not valid UTF-8"),
        ([1, 2], "must be a JSON object, got list"),
        ({"input": "q"}, "record has no 'id'"),
        ({"id": True, "input": "q"}, "'id' must be a non-empty string or integer"),
        (
            {"id": "x", "input": ""},
            "id x: 'input' must be a non-empty string.*run restore_triviaqa first",
        ),
        ({"id": "x", "input": 3}, "id x: 'input' must be a non-empty string"),
        ({"id": "x", "input": "q", "meta": []}, "'meta' must be an object"),
        ({"id": "x", "input": "q", "output": {}}, "'output' must be a list"),
        ({"id": "x", "input": "q", "output": ["a"]}, "output 0 is not an object"),
        (
            {"id": "x", "input": "q", "output": [{"answer": 4}]},
            "output 0: 'answer' must be a string",
        ),
        ({"id": "x", "input": "q", "output": [{"provenance": {}}]}, "'provenance' must be a list"),
        (
            {"id": "x", "input": "q", "output": [{"provenance": [{"title": "T"}]}]},
            "provenance 0 has no 'wikipedia_id'",
        ),
        (
            {
                "id": "x",
                "input": "q",
                "output": [{"provenance": [{"wikipedia_id": "1", "start_paragraph_id": "a"}]}],
            },
            "'start_paragraph_id' must be an integer",
        ),
        (
            {
                "id": "x",
                "input": "q",
                "output": [{"provenance": [{"wikipedia_id": "1", "bleu_score": "1"}]}],
            },
            "'bleu_score' must be a number",
        ),
    ],
)
def test_read_kilt_rejects_bad_lines_with_file_and_line(tmp_path, line, reason):
  path = write_lines(tmp_path / "bad.jsonl", [NQ_LINE, line])
  with pytest.raises(kilt.KiltFormatError, match=f"^{re.escape(path)}:2: .*{reason}") as err:
    list(kilt.read_kilt(path))
  assert err.value.path == path and err.value.line == 2


def test_readers_stream_line_by_line(tmp_path):
  path = write_lines(tmp_path / "nq.jsonl", [NQ_LINE, NQ_LINE, b"garbage\n"])
  records = iter(kilt.read_kilt(path))
  assert next(records).id == "-4471" and next(records).id == "-4471"  # before the bad line is read
  with pytest.raises(kilt.KiltFormatError, match=":3:"):
    next(records)


def test_skip_bad_lines_counts_and_warns(tmp_path, caplog):
  path = write_lines(tmp_path / "nq.jsonl", [b"[]\n", NQ_LINE, b"\xfe\n", {"id": 1}, NQ_LINE])
  reader = kilt.read_kilt(path, skip_bad_lines=True)
  with caplog.at_level(logging.WARNING):
    assert len(list(reader)) == 2
  assert reader.num_skipped == 3
  assert [m.split(": ")[0] for m in reader.skipped] == [f"{path}:1", f"{path}:3", f"{path}:4"]
  assert f"skipped 3 bad line(s) of {path}" in caplog.text


# ---------------------------------------------------------------- knowledge source


def test_read_knowledge_source(tmp_path):
  minimal = {"wikipedia_id": 7, "wikipedia_title": "A", "text": ["A\n"]}
  path = write_lines(tmp_path / "ks.json", [PAGE, minimal])
  pages = list(kilt.read_knowledge_source(path))
  assert pages[0].wikipedia_id == "64" and pages[0].title == "Hey Jude"
  assert pages[0].paragraphs == ("Hey Jude\n", "Hey Jude is a song.\n")
  assert pages[0].anchors[0]["href"] == "Song" and pages[0].categories == "1968 songs"
  assert pages[0].wikidata_info == {"wikidata_id": "Q202"}
  assert pages[1] == kilt.KnowledgePage("7", "A", ("A\n",), (), "", {}, {})


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"text": []}, "page 64 has no text"),
        ({"text": None}, "page 64 has no text"),
        ({"text": ["ok", 3]}, "every paragraph of 'text' must be a string"),
        ({"wikipedia_title": None}, "'wikipedia_title' must be a string"),
        ({"wikipedia_id": ""}, "'wikipedia_id' must be a non-empty"),
        ({"anchors": [1]}, "'anchors' must be a list of objects"),
    ],
)
def test_knowledge_source_bad_pages(tmp_path, change, reason):
  path = write_lines(tmp_path / "ks.json", [PAGE, {**PAGE, **change}, PAGE])
  with pytest.raises(kilt.KiltFormatError, match=f"^{re.escape(path)}:2: .*{reason}"):
    list(kilt.read_knowledge_source(path))
  reader = kilt.read_knowledge_source(path, skip_bad_lines=True)
  assert len(list(reader)) == 2 and reader.num_skipped == 1


# ---------------------------------------------------------------- garbage in


KEYS = [
    "id",
    "input",
    "output",
    "meta",
    "answer",
    "provenance",
    "wikipedia_id",
    "title",
    "section",
    "start_paragraph_id",
    "end_paragraph_id",
    "bleu_score",
    "wikipedia_title",
    "text",
    "anchors",
    "categories",
    "history",
    "wikidata_info",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=20,
)
# Lines that are nearly records: valid ones with a key dropped or a value replaced by anything.
NEAR = st.tuples(st.sampled_from([NQ_LINE, PAGE]), st.sampled_from(KEYS), JSON, st.booleans()).map(
    lambda t: {k: v for k, v in t[0].items() if not (t[3] and k == t[1])}
    | ({} if t[3] else {t[1]: t[2]})
)
GARBAGE = (
    st.binary(max_size=60)
    | JSON.map(lambda v: json.dumps(v).encode())
    | NEAR.map(lambda v: json.dumps(v).encode())
)


def _valid_record(r):
  return (
      isinstance(r.id, str)
      and r.id
      and isinstance(r.input, str)
      and r.input.strip()
      and all(isinstance(a, str) and a for a in r.answers)
      and isinstance(r.meta, dict)
      and all(isinstance(p.wikipedia_id, str) for p in r.provenance)
  )


def _valid_page(p):
  return (
      isinstance(p.wikipedia_id, str)
      and p.paragraphs
      and all(isinstance(t, str) for t in p.paragraphs)
  )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=GARBAGE)
def test_garbage_lines_give_a_record_or_the_readers_error(line):
  with tempfile.TemporaryDirectory() as tmp:
    path = write_lines(os.path.join(tmp, "g.jsonl"), [line.replace(b"\n", b" ") + b"\n"])
    for read, valid in (
        (kilt.read_kilt, _valid_record),
        (kilt.read_knowledge_source, _valid_page),
    ):
      try:
        records = list(read(path))
      except kilt.KiltFormatError as err:
        assert str(err).startswith(f"{path}:1: ")
      else:
        assert all(valid(r) for r in records)
      reader = read(path, skip_bad_lines=True)
      assert len(list(reader)) + reader.num_skipped == (
          1 if line.replace(b"\n", b" ").strip() else 0
      )
    # The TriviaQA restore and the scorer's loader and checks refuse with their own errors too.
    trivia = os.path.join(tmp, "trivia.json")
    with open(trivia, "w") as f:
      json.dump({"Data": [{"QuestionId": "-4471", "Question": "who sang hey jude"}]}, f)
    try:
      kilt.restore_triviaqa_questions(path, [trivia], os.path.join(tmp, "out.jsonl"))
    except kilt.KiltFormatError as err:
      assert str(err).startswith(f"{path}:1: ")
    try:
      for _, obj in kilt.iter_jsonl(path):
        kilt_metrics.check_record(obj, "gold")
    except (kilt.KiltFormatError, kilt_metrics.KiltScoreError):
      pass


# ---------------------------------------------------------------- TriviaQA


def _trivia(tmp_path):
  ids = write_lines(
      tmp_path / "triviaqa-dev_id-kilt.jsonl",
      [
          {"id": "tc_1", "input": "", "output": [{"answer": "Paris"}], "meta": {}},
          {"id": "qz_2", "output": [{"answer": "Blue", "provenance": [{"wikipedia_id": "3"}]}]},
      ],
  )
  (tmp_path / "web-dev.json").write_text(
      json.dumps({"Data": [{"QuestionId": "tc_1", "Question": "Capital of France?", "Answer": {}}]})
  )
  (tmp_path / "wiki-dev.json").write_text(
      json.dumps(
          {
              "Data": [
                  {"QuestionId": "qz_2", "Question": "Colour of the sky?"},
                  {"QuestionId": "tc_1", "Question": "Capital of France?"},
              ]
          }
      )
  )
  return ids, [str(tmp_path / "web-dev.json"), str(tmp_path / "wiki-dev.json")]


def test_restore_triviaqa_questions(tmp_path):
  ids, trivia = _trivia(tmp_path)
  out = str(tmp_path / "triviaqa-dev-kilt.jsonl")
  assert kilt.restore_triviaqa_questions(ids, trivia, out) == 2
  records = list(kilt.read_kilt(out, require_answers=True))
  assert [(r.id, r.input, r.answers) for r in records] == [
      ("tc_1", "Capital of France?", ("Paris",)),
      ("qz_2", "Colour of the sky?", ("Blue",)),
  ]
  assert records[1].provenance[0].wikipedia_id == "3"
  with pytest.raises(kilt.KiltFormatError, match="run restore_triviaqa first"):
    list(kilt.read_kilt(ids))


def test_restore_triviaqa_errors(tmp_path):
  ids, trivia = _trivia(tmp_path)
  out = tmp_path / "out.jsonl"
  with pytest.raises(
      kilt.KiltFormatError, match=f"{ids}:2: id qz_2 is in none of the TriviaQA files"
  ):
    kilt.restore_triviaqa_questions(ids, trivia[:1], str(out))
  assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()
  (tmp_path / "bad.json").write_text(json.dumps({"Data": [{"QuestionId": "tc_1"}]}))
  with pytest.raises(
      ValueError, match=r"bad.json: Data\[0\] needs string 'QuestionId' and 'Question'"
  ):
    kilt.restore_triviaqa_questions(ids, [str(tmp_path / "bad.json")], str(out))
  (tmp_path / "clash.json").write_text(
      json.dumps({"Data": [{"QuestionId": "tc_1", "Question": "Other?"}]})
  )
  with pytest.raises(
      ValueError, match="QuestionId tc_1 also in .*web-dev.json with another question"
  ):
    kilt.restore_triviaqa_questions(ids, [trivia[0], str(tmp_path / "clash.json")], str(out))


def test_restore_triviaqa_cli(tmp_path, capsys):
  ids, trivia = _trivia(tmp_path)
  out = str(tmp_path / "cli.jsonl")
  kilt.main(
      ["restore_triviaqa", "--kilt_file", ids, "--triviaqa_files", ",".join(trivia), "--out", out]
  )
  assert f"wrote 2 records to {out}" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    kilt.main(["restore_triviaqa", "--kilt_file", ids, "--triviaqa_files", trivia[0], "--out", out])
  assert exit_info.value.code == 1 and "id qz_2 is in none" in capsys.readouterr().err
