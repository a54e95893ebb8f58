"""KILT metrics against hand-computed values, with the official scorer's quirks and refusals."""

import logging

import pytest

from lumenvq.data import kilt_metrics as km

EXACT_ROUGE = 2.0 / (2.0 + 1e-8)  # `rouge`'s F for a perfect match: 0.999999995


def f_rouge(p, r):
  return 2.0 * (p * r) / (p + r + 1e-8)


def prov(*pages, **extra):
  return [{"wikipedia_id": str(p), **extra} for p in pages]


def rec(rid, answer=None, pages=(), **fields):
  output = {"provenance": prov(*pages)}
  if answer is not None:
    output["answer"] = answer
  return {"id": rid, "output": [output], **fields}


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theater", "theater"),
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
  assert km.normalize_answer(text) == expected


def test_exact_match_and_f1():
  assert km.exact_match("The Beatles!", "beatles")
  assert not km.exact_match("Beatles", "Rolling Stones")
  # pred {cat, sat}, gold {cat, sat, down}: P=1, R=2/3
  assert km.f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)
  assert km.f1_score("dog", "cat") == 0.0
  assert km.f1_score("the", "a") == 0.0  # both normalise to nothing: no shared token
  assert km.f1_score("cat cat", "cat") == pytest.approx(
      2 * 0.5 * 1 / 1.5
  )  # counts with multiplicity


@pytest.mark.parametrize(
    "pred,gold,expected",
    [
        ("suicide", "suicide", EXACT_ROUGE),
        ("a suicide", "suicide", f_rouge(1 / 2, 1)),
        ("suicide", "it was suicide", f_rouge(1, 1 / 3)),
        # Distinct words: "the" three times is one word on each side.
        ("the the the", "the", EXACT_ROUGE),
        # The LCS read out on a tie is "y x" (2 distinct words), not "x x" (1).
        ("y x x", "x y x", EXACT_ROUGE),
        # "." splits sentences: LCS({c a b}, {a b}) + LCS({c a b}, {c}) covers all 3 words.
        ("a b. c", "c a b", EXACT_ROUGE),
        # A blank piece between dots is the sentence "" whose word "" counts in the length.
        ("x. .y", "x y", f_rouge(2 / 3, 1)),
        # No normalisation: case and punctuation matter.
        ("Paris,", "paris", f_rouge(0, 0)),
        # Only dots: no sentence, the package's ValueError, which KILT scores 0.
        ("...", "x", 0.0),
        ("x", "...", 0.0),
    ],
)
def test_rouge_l_reproduces_the_rouge_package(pred, gold, expected):
  assert km.rouge_l(pred, gold) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_long_answers_do_not_recurse():
  words = " ".join(f"w{i}" for i in range(1100))  # deeper than Python's recursion limit
  assert km.rouge_l(words, words) == pytest.approx(EXACT_ROUGE, abs=1e-12)


# ---------------------------------------------------------------- retrieval


def test_rprecision_is_best_over_gold_outputs():
  gold = {
      "id": 1,
      "output": [{"provenance": prov(1, 2)}, {"provenance": prov(3)}, {"answer": "x"}],
  }
  assert km.rprecision(rec(1, pages=(2, 5, 1)), gold, ["wikipedia_id"]) == 0.5  # {1,2}: 1 of top 2
  assert km.rprecision(rec(1, pages=(3, 1)), gold, ["wikipedia_id"]) == 1.0  # {3}: top 1
  assert km.rprecision(rec(1, pages=()), gold, ["wikipedia_id"]) == 0.0


def test_evidence_rank_precision_recall_success():
  gold = {
      "id": 1,
      "output": [{"provenance": prov(1, 2)}, {"provenance": prov(3)}, {"answer": "x"}],
  }
  rank, num_sets = km.evidence_rank(rec(1, pages=(3, 1, 9, 2)), gold, ["wikipedia_id"])
  # 3 completes {3}; 1 half-completes {1,2}; 9 is no evidence; 2 completes {1,2},
  # whose partial point is moved to where its last page was found.
  assert rank == [True, False, True] and num_sets == 2
  assert km.precision_at_k(rank, 1) == 1.0
  assert km.precision_at_k(rank, 2) == 0.5
  assert km.precision_at_k(rank, 5) == 2 / 5
  assert km.recall_at_k(rank, num_sets, 2) == 0.5
  assert km.recall_at_k(rank, num_sets, 5) == 1.0
  assert km.success_rate_at_k(rank, 1) == 1.0
  rank, _ = km.evidence_rank(rec(1, pages=(1, 9)), gold, ["wikipedia_id"])
  assert rank == ["evidence_set:0", False] and km.success_rate_at_k(rank, 5) == 0.0


def test_rank_keys_join_and_empty_provenance_is_an_unreachable_evidence_set():
  gold = {
      "id": 1,
      "output": [{"provenance": []}, {"provenance": [{"wikipedia_id": 5, "section": "History"}]}],
  }
  guess = {
      "id": 1,
      "output": [
          {
              "provenance": [
                  {"wikipedia_id": "5", "section": "Other"},
                  {"wikipedia_id": " 5", "section": "History "},
              ]
          }
      ],
  }
  report = km.evaluate_retrieval([gold], [guess], ks=[1, 5], rank_keys=["wikipedia_id", "section"])
  assert report["Rprec"] == 0.0  # the first output has no provenance and the second's top-1 misses
  assert report["precision@1"] == 0.0 and report["precision@5"] == 1 / 5
  assert report["recall@5"] == 1 / 2  # 2 evidence sets, one of them empty
  by_page = km.evaluate_retrieval([gold], [guess], ks=[1], rank_keys=["wikipedia_id"])
  assert by_page["Rprec"] == 1.0 and by_page["precision@1"] == 1.0


def test_retrieval_report_keys_and_context_metrics():
  gold = [
      {
          "id": "m",
          "input": "Who painted the Mona Lisa?",
          "output": [{"answer": "Leonardo da Vinci", "provenance": prov(1, title="Mona Lisa")}],
      },
      {
          "id": "n",
          "input": "Capital of the French Republic?",
          "output": [{"answer": "Paris", "provenance": prov(2, title="France")}],
      },
  ]
  guess = [
      {
          "id": "m",
          "output": [
              {
                  "provenance": [
                      {"wikipedia_id": "7", "text": "nothing here"},
                      {"wikipedia_id": "1", "text": "The Mona Lisa is by Leonardo da Vinci."},
                  ]
              }
          ],
      },
      {
          "id": "n",
          "output": [
              {"answer": "Paris"},
              {"provenance": [{"wikipedia_id": "2", "text": "Lyon."}]},
          ],
      },
  ]
  report = km.evaluate_retrieval(gold, guess, ks=[5, 1])
  assert list(report) == [
      "Rprec",
      "entity_in_input",
      "precision@1",
      "answer_in_context@1",
      "answer_and_ent_in_context@1",
      "entity_in_context@1",
      "precision@5",
      "answer_in_context@5",
      "answer_and_ent_in_context@5",
      "entity_in_context@5",
      "recall@5",
      "success_rate@5",
  ]
  assert report["Rprec"] == 0.5  # m: top-1 is page 7; n: page 2
  assert report["entity_in_input"] == 0.5  # "mona lisa" is in m's question, "france" not in n's
  assert report["answer_in_context@1"] == 0.0 and report["answer_in_context@5"] == 0.5
  assert report["answer_and_ent_in_context@5"] == 0.5 and report["entity_in_context@5"] == 0.5
  assert (
      report["precision@1"] == 0.5 and report["recall@5"] == 1.0 and report["success_rate@5"] == 1.0
  )
  del gold[1]["input"]
  assert km.evaluate_retrieval(gold, guess, ks=[1])["entity_in_input"] is None


# ---------------------------------------------------------------- downstream


def test_downstream_report_by_hand(caplog):
  gold = [
      rec("a", "Paris", pages=(10,)),
      {
          "id": "b",
          "output": [{"answer": "blue whale", "provenance": prov(20)}, {"answer": "whale"}],
      },
      rec(3, "x", pages=(30,)),
      rec("d", "Rome", pages=(40,)),
  ]
  guess = [
      rec("zzz", "extra", pages=()),  # not in gold: ignored after a warning, as officially
      rec("d", "Rome", pages=(41,)),  # strict match, wrong page
      rec("b", "the blue whale", pages=(20, 21)),  # normalised match, right page
      rec(" 3 ", "", pages=(30,)),  # ids compare as stripped strings; empty answer scores 0
      rec("a", "paris", pages=(10,)),  # normalised match, right page
  ]
  with caplog.at_level(logging.WARNING):
    report = km.evaluate_downstream(gold, guess)
  assert "different size" in caplog.text
  rouge_b = f_rouge(2 / 3, 1)  # {the blue whale} vs {blue whale}; vs "whale" it is lower
  expected = {
      "kilt": {
          "KILT-accuracy": 0.0,
          "KILT-em": 2 / 4,
          "KILT-f1": 2 / 4,
          "KILT-rougel": rouge_b / 4,
      },
      "downstream": {
          "accuracy": 1 / 4,
          "em": 3 / 4,
          "f1": 3 / 4,
          "rougel": (rouge_b + EXACT_ROUGE) / 4,
      },
      "retrieval": {"Rprec": 3 / 4, "recall@5": 3 / 4},  # record 3 still retrieves
  }
  assert report.keys() == expected.keys()
  for group, values in expected.items():
    assert report[group].keys() == values.keys()
    for key, value in values.items():
      assert report[group][key] == pytest.approx(value, abs=1e-12), (group, key)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "gold,guess,message",
    [
        ([rec("a", "x"), rec("b", "y")], [rec("a", "x")], "no prediction provided for id: b"),
        ([rec(1, "x"), rec("1", "y")], [rec(1, "x")], "gold ids must be unique: id 1"),
        ([rec(1, "x")], [rec(1, "x"), rec(" 1", "x")], "prediction ids must be unique: id 1"),
        (
            [rec(1, "x")],
            [{"id": 1, "output": [{"answer": "x"}, {"answer": "y"}]}],
            "exactly one valid answer for id 1",
        ),
        ([rec(1, "x")], [rec(1, None, pages=(1,))], "exactly one valid answer for id 1"),
        ([rec(1, None, pages=(1,))], [rec(1, "x")], "gold record id 1 has no answer"),
        ([{"id": 1, "output": [{"answer": 5}]}], [rec(1, "x")], "answer is not a string"),
        ([{"output": []}], [rec(1, "x")], "gold record has no 'id'"),
        (["not a record"], [rec(1, "x")], "not a JSON object"),
        (
            [{"id": 1, "output": {"answer": "x"}}],
            [rec(1, "x")],
            "'output' must be a list of objects",
        ),
        ([rec(1, "x")], [{"id": 1}], "no 'output'"),
        (
            [rec(1, "x")],
            [{"id": 1, "output": [{"answer": "x", "provenance": "p1"}]}],
            "'provenance' must be a list",
        ),
    ],
)
def test_downstream_refusals(gold, guess, message):
  with pytest.raises(km.KiltScoreError, match=message):
    km.evaluate_downstream(gold, guess)


def test_refusals_say_which_input():
  with pytest.raises(km.KiltScoreError) as err:
    km.evaluate_downstream([rec("a", "x")], [])
  assert err.value.role == "guess"
  with pytest.raises(km.KiltScoreError) as err:
    km.evaluate_downstream([{"id": 1, "output": [{"answer": 5}]}], [rec(1, "x")])
  assert err.value.role == "gold"


@pytest.mark.parametrize(
    "guess,kwargs,message",
    [
        ({"id": 1, "output": [{"answer": "x"}]}, {}, "exactly one output with provenance for id 1"),
        (
            {"id": 1, "output": [{"provenance": []}, {"provenance": []}]},
            {},
            "exactly one output with provenance",
        ),
        (rec(1, pages=(1,)), {"ks": [0, 5]}, "ks must be positive"),
        (rec(1, pages=(1,)), {"ks": [5, 5]}, "ks must not repeat"),
        (rec(1, pages=(1,)), {"rank_keys": []}, "rank_keys must be non-empty"),
    ],
)
def test_retrieval_refusals(guess, kwargs, message):
  with pytest.raises(km.KiltScoreError, match=message):
    km.evaluate_retrieval([rec(1, "x", pages=(1,))], [guess], **kwargs)
