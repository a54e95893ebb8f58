"""The kilt_eval CLI: report keys and numbers as the official scorer prints them; refusals."""

import json
import subprocess
import sys

import pytest

from lumenvq import kilt_eval

GOLD = [
    {
        "id": "q1",
        "input": "Who wrote Hamlet?",
        "output": [
            {
                "answer": "William Shakespeare",
                "provenance": [{"wikipedia_id": "11", "section": "Works"}],
            }
        ],
    },
    {
        "id": "q2",
        "input": "Largest planet?",
        "output": [
            {"answer": "Jupiter", "provenance": [{"wikipedia_id": "22", "section": "Intro"}]},
            {"answer": "planet Jupiter"},
        ],
    },
]
GUESS = [
    {
        "id": "q1",
        "output": [
            {"answer": "Shakespeare", "provenance": [{"wikipedia_id": "11", "section": "Life"}]}
        ],
    },
    {
        "id": "q2",
        "output": [
            {"answer": "Jupiter", "provenance": [{"wikipedia_id": "9"}, {"wikipedia_id": "22"}]}
        ],
    },
]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture
def files(tmp_path):
  return write_jsonl(tmp_path / "guess.jsonl", GUESS), write_jsonl(tmp_path / "gold.jsonl", GOLD)


def run(capsys, *argv):
  code = kilt_eval.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_downstream_report(files, capsys):
  code, out, _ = run(capsys, *files)
  assert code == 0
  report = json.loads(out)
  # q1: F1 of {shakespeare} vs {william shakespeare} = 2/3, right page;
  # q2: exact, but page 22 only at rank 2.
  rouge_q1 = 2 * (1 * 0.5) / (1.5 + 1e-8)
  expected = {
      "kilt": {
          "KILT-accuracy": 0.0,
          "KILT-em": 0.0,
          "KILT-f1": (2 / 3) / 2,
          "KILT-rougel": rouge_q1 / 2,
      },
      "downstream": {
          "accuracy": 1 / 2,
          "em": 1 / 2,
          "f1": (2 / 3 + 1) / 2,
          "rougel": (rouge_q1 + 2 / (2 + 1e-8)) / 2,
      },
      "retrieval": {"Rprec": 1 / 2, "recall@5": 1.0},
  }
  assert list(report) == list(expected)
  for group, values in expected.items():
    assert report[group] == pytest.approx(values, abs=1e-12)
    assert list(report[group]) == list(values)


def test_retrieval_report(files, capsys):
  code, out, _ = run(
      capsys, *files, "--retrieval", "--ks", "1,2", "--rank_keys", "wikipedia_id,section"
  )
  assert code == 0
  report = json.loads(out)
  assert set(report) == {
      "Rprec",
      "entity_in_input",
      "precision@1",
      "precision@2",
      "recall@2",
      "success_rate@2",
      *(
          f"{m}@{k}"
          for m in ("answer_in_context", "answer_and_ent_in_context", "entity_in_context")
          for k in (1, 2)
      ),
  }
  # (page, section) pairs: q1 guesses 11+Life (gold 11+Works); q2's guesses have no section.
  assert report["Rprec"] == 0.0 and report["precision@1"] == 0.0 and report["recall@2"] == 0.0
  code, out, _ = run(capsys, *files, "--retrieval", "--ks", "1,2")
  report = json.loads(out)
  assert (
      report["Rprec"] == 1 / 2
      and report["precision@2"] == 1 / 2
      and report["success_rate@2"] == 1.0
  )


def test_refusals_name_the_file(tmp_path, files, capsys):
  guess, gold = files
  missing = write_jsonl(tmp_path / "missing.jsonl", GUESS[:1])
  code, _, err = run(capsys, missing, gold)
  assert code == 1 and f"{missing}: no prediction provided for id: q2" in err
  two = write_jsonl(
      tmp_path / "two.jsonl",
      [GUESS[0], {"id": "q2", "output": [{"answer": "a"}, {"answer": "b"}]}],
  )
  code, _, err = run(capsys, two, gold)
  assert code == 1 and f"{two}: you should provide exactly one valid answer for id q2" in err
  broken = tmp_path / "broken.jsonl"
  broken.write_text(json.dumps(GUESS[0]) + "\n{not json\n")
  code, _, err = run(capsys, str(broken), gold)
  assert code == 1 and f"{broken}:2: not valid JSON" in err
  no_id = write_jsonl(tmp_path / "no_id.jsonl", [GUESS[0], {"output": []}])
  code, _, err = run(capsys, no_id, gold)
  assert code == 1 and f"{no_id}:2: guess record has no 'id'" in err
  code, _, err = run(capsys, guess, gold, "--retrieval", "--ks", "0,5")
  assert code == 1 and "ks must be positive" in err
  code, _, err = run(capsys, guess, str(tmp_path / "absent.jsonl"))
  assert code == 1 and "absent.jsonl" in err


def test_module_entry_point(files):
  proc = subprocess.run(
      [sys.executable, "-m", "lumenvq.kilt_eval", *files], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["downstream"]["accuracy"] == 0.5
