"""BM25 over a tiny corpus, KILT-format output, the saved index, and reading retrieval files."""

import json
import logging
import os

import numpy as np
import pytest

from lumenvq import paths
from lumenvq.data import kilt, passage_table, passages, retrieve

TOPICS = {
    "100": (
        "Platypus",
        [
            "The platypus is a mammal that lays eggs in burrows near rivers of eastern Australia.",
            "Section::::Diet.",
            "It hunts shrimp and insect larvae underwater with its bill.",
        ],
    ),
    "200": (
        "Volcano",
        ["A volcano erupts molten lava and ash from a magma chamber below the crust."],
    ),
    "300": (
        "Chess",
        ["Chess is a board game for two players with kings, queens, rooks and pawns."],
    ),
    "400": (
        "Glacier",
        ["A glacier is a persistent body of dense ice moving slowly under its own weight."],
    ),
}
QUESTIONS = [
    ("q1", "which mammal lays eggs in burrows", "100"),
    ("q2", "what does a glacier of dense ice do", "400"),
    ("q3", "how many players in the board game chess", "300"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  with open(root / "ks.json", "w") as f:
    for wid, (title, paragraphs) in TOPICS.items():
      f.write(
          json.dumps({"wikipedia_id": wid, "wikipedia_title": title, "text": [title, *paragraphs]})
          + "\n"
      )
  passages.build(str(root / "ks.json"), str(root / "table"), words=12, progress=False)
  with open(root / "nq-dev-kilt.jsonl", "w") as f:
    for qid, question, wid in QUESTIONS:
      f.write(
          json.dumps(
              {
                  "id": qid,
                  "input": question,
                  "output": [
                      {
                          "answer": "x",
                          "provenance": [{"wikipedia_id": wid, "start_paragraph_id": 1}],
                      }
                  ],
              }
          )
          + "\n"
      )
  return root, passage_table.PassageTable(root / "table")


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_answer_passage_ranks_first_and_output_is_kilt_format(world, tmp_path):
  root, table = world
  [out] = retrieve.run(
      str(root / "table"), [str(root / "nq-dev-kilt.jsonl")], str(tmp_path), k=3, progress=False
  )
  assert out == str(tmp_path / "nq-dev-bm25-kilt.jsonl")
  records = _lines(out)
  assert [r["id"] for r in records] == ["q1", "q2", "q3"] and records[0]["input"] == QUESTIONS[0][1]
  for record, (_, _, wid) in zip(records, QUESTIONS):
    [output] = record["output"]
    top = output["provenance"]
    assert len(top) == 3 and top[0]["wikipedia_id"] == wid
    assert [p["score"] for p in top] == sorted((p["score"] for p in top), reverse=True)
    passage = table[top[0]["passage_id"]]
    assert top[0] == {
        "wikipedia_id": wid,
        "title": passage.title,
        "passage_id": passage.id,
        "start_paragraph_id": passage.start_paragraph_id,
        "end_paragraph_id": passage.end_paragraph_id,
        "start_character": passage.start_character,
        "end_character": passage.end_character,
        "score": top[0]["score"],
    }
  first = [ids[0] for _, ids in retrieve.read_retrieval(out, 5, table)]
  assert first == [r["output"][0]["provenance"][0]["passage_id"] for r in records]
  _, ids = next(retrieve.read_retrieval(out, 5, table))
  assert ids.dtype == np.int32 and list(ids[3:]) == [-1, -1]  # 3 retrieved, padded to 5


def test_index_is_saved_and_reused_and_outputs_resume(world, tmp_path, monkeypatch, caplog):
  root, table = world
  args = (str(root / "table"), [str(root / "nq-dev-kilt.jsonl")], str(tmp_path))
  retrieve.run(*args, k=2, progress=False)
  assert os.path.exists(tmp_path / retrieve.INDEX_DIR / "lumenvq_index.json")
  mtime = os.path.getmtime(tmp_path / "nq-dev-bm25-kilt.jsonl")

  def no_build(*a, **kw):
    raise AssertionError("the saved index should have been loaded")

  monkeypatch.setattr(retrieve.Bm25Index, "build", no_build)
  with caplog.at_level(logging.INFO, logger=retrieve.logger.name):
    retrieve.run(*args, k=2, progress=False)
  assert (
      os.path.getmtime(tmp_path / "nq-dev-bm25-kilt.jsonl") == mtime
  )  # skipped: same input, K, table
  assert "nq-dev-bm25-kilt.jsonl is up to date" in caplog.text  # and says so
  retrieve.run(*args, k=100, progress=False)  # another K: rewritten, k clamped to the corpus
  assert len(_lines(tmp_path / "nq-dev-bm25-kilt.jsonl")[0]["output"][0]["provenance"]) == len(
      table
  )
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_external_kilt_retrieval_maps_to_passages(world, tmp_path):
  _, table = world
  platypus = list(table.page_passages("100"))
  assert len(platypus) >= 2
  rows = [
      {
          "id": "a",
          "output": [
              {
                  "provenance": [
                      {
                          "wikipedia_id": "100",
                          "start_paragraph_id": 3,
                          "end_paragraph_id": 3,
                      },  # the diet paragraph
                      {"wikipedia_id": 300},  # page level: the page's first passage
                      {"wikipedia_id": "100", "start_paragraph_id": 1},
                  ]
              }
          ],
      },
      {"id": "b", "output": [{"provenance": [{"passage_id": platypus[0], "wikipedia_id": "100"}]}]},
      {"id": "c", "output": []},
  ]
  path = tmp_path / "guess.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = {rid: ids.tolist() for rid, ids in retrieve.read_retrieval(str(path), 4, table)}
  diet = table.passages_for("100", 3).tolist()
  expected = list(
      dict.fromkeys(diet + [table.page_passages("300")[0]] + table.passages_for("100", 1).tolist())
  )
  assert got["a"] == (expected + [-1] * 4)[:4]
  assert got["b"] == [platypus[0], -1, -1, -1] and got["c"] == [-1] * 4
  assert table[diet[-1]].text.endswith("bill.")

  def fails(provenance, line_before=1):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "ok", "output": []}\n' * line_before
        + json.dumps({"id": "z", "output": [{"provenance": [provenance]}]})
        + "\n"
    )
    with pytest.raises(kilt.KiltFormatError) as err:
      list(retrieve.read_retrieval(str(bad), 3, table))
    assert str(err.value).startswith(f"{bad}:{line_before + 1}: id z: provenance 0: ")
    return str(err.value)

  assert "wikipedia_id 999 is not a page" in fails({"wikipedia_id": "999", "start_paragraph_id": 1})
  assert "page 200 has paragraphs 0..1, not 7..7" in fails(
      {"wikipedia_id": "200", "start_paragraph_id": 7}
  )
  assert f"passage id 99 is out of range: the table {table.directory} has {len(table)}" in fails(
      {"passage_id": 99}
  )
  assert "is on page 100" in fails(
      {"passage_id": platypus[0], "wikipedia_id": "200"}, line_before=3
  )
  assert "neither 'passage_id' nor 'wikipedia_id'" in fails({"title": "Chess"})


def test_cli_with_data_dir_and_task_names(world, tmp_path, capsys):
  root, _ = world
  retrieve.main(
      [
          "--passages",
          str(root / "table"),
          "--data_dir",
          str(root),
          "--tasks",
          "nq",
          "--splits",
          "dev",
          "--out",
          str(tmp_path),
          "--k",
          "1",
          "--no_progress",
      ]
  )
  out = capsys.readouterr().out.strip()
  assert out == str(tmp_path / "nq-dev-bm25-kilt.jsonl")
  assert [r["output"][0]["provenance"][0]["wikipedia_id"] for r in _lines(out)] == [
      q[2] for q in QUESTIONS
  ]
  with pytest.raises(SystemExit):
    retrieve.main(
        [
            "--passages",
            str(root / "table"),
            "--data_dir",
            str(root),
            "--tasks",
            "nq",
            "--splits",
            "train",
            "--out",
            str(tmp_path),
        ]
    )
  assert "nq-train-kilt.jsonl" in capsys.readouterr().err


def test_on_gs_the_output_equals_the_local_one_and_the_index_is_reused(
    world, gcs_bucket, tmp_path, monkeypatch
):
  """KILT file and output directory on the local Cloud Storage server: the retrieval file and
  its .done record are objects written whole, and the BM25 index is saved beside them (its
  meta object last) and loaded back through a local copy."""
  root, table = world
  prefix = f"{gcs_bucket}/retrieve-{os.getpid()}"
  paths.upload(str(root / "nq-dev-kilt.jsonl"), f"{prefix}/data/nq-dev-kilt.jsonl")
  [local] = retrieve.run(
      str(root / "table"), [str(root / "nq-dev-kilt.jsonl")], str(tmp_path), k=3, progress=False
  )
  args = (str(root / "table"), [f"{prefix}/data/nq-dev-kilt.jsonl"], f"{prefix}/out")
  [remote] = retrieve.run(*args, k=3, progress=False)
  assert remote == f"{prefix}/out/nq-dev-bm25-kilt.jsonl"
  assert paths.path(remote).read_text() == open(local).read()
  assert json.loads(paths.path(remote + ".done").read_text())["records"] == len(QUESTIONS)
  assert paths.path(prefix, "out", retrieve.INDEX_DIR, "lumenvq_index.json").exists()

  def no_build(*a, **kw):
    raise AssertionError("the index saved on gs:// should have been loaded")

  monkeypatch.setattr(retrieve.Bm25Index, "build", no_build)
  retrieve.run(*args, k=4, progress=False)  # Another K: rewritten with the loaded index.
  [record, *_] = [json.loads(line) for line in paths.path(remote).read_text().splitlines()]
  assert len(record["output"][0]["provenance"]) == 4
  assert [ids[0] for _, ids in retrieve.read_retrieval(remote, 4, table)] == [
      ids[0] for _, ids in retrieve.read_retrieval(local, 4, table)
  ]
