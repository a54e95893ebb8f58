"""The demo world and its KILT files: determinism, file names and formats, gold provenance,
held-out dev pairs, FEVER labels, sizes, and the atomic write / manifest behaviour."""

import collections
import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from lumenvq.data import demo, demo_world, kilt

SMALL = dict(seed=3, num_entities=300, train_size=300, dev_size=60)
TASKS = ("nq", "hotpotqa", "fever", "structured_zeroshot")
TASK_FILES = [f"{task}-{split}-kilt.jsonl" for task in TASKS for split in ("train", "dev")]
KS = "kilt_knowledgesource.json"


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def hashes(directory):
  return {name: sha256(os.path.join(directory, name)) for name in [KS, *TASK_FILES]}


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_small")
  demo.write_demo(str(out), **SMALL)
  return out


@pytest.fixture(scope="module")
def pages(small_dir):
  return {page["wikipedia_id"]: page for page in read_jsonl(small_dir / KS)}


@pytest.fixture(scope="module")
def records(small_dir):
  return {name: read_jsonl(small_dir / name) for name in TASK_FILES}


# ---------------------------------------------------------------- determinism and names


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(small_dir, tmp_path):
  demo.write_demo(str(tmp_path / "again"), **SMALL)
  assert hashes(small_dir) == hashes(tmp_path / "again")
  demo.write_demo(str(tmp_path / "other"), **{**SMALL, "seed": 4})
  other = hashes(tmp_path / "other")
  assert all(other[name] != h for name, h in hashes(small_dir).items())


def test_writes_kilt_file_names_and_a_manifest_of_their_hashes(small_dir):
  assert sorted(os.listdir(small_dir)) == sorted([KS, "demo_manifest.json", *TASK_FILES])
  manifest = json.loads((small_dir / "demo_manifest.json").read_text())
  assert manifest["settings"] == {"format_version": demo.FORMAT_VERSION, **SMALL}
  assert {name: info["sha256"] for name, info in manifest["files"].items()} == hashes(small_dir)


def test_sizes_follow_the_flags(small_dir, pages, records):
  assert len(pages) == SMALL["num_entities"]
  for name, lines in records.items():
    assert len(lines) == SMALL["train_size" if "-train-" in name else "dev_size"], name


# ---------------------------------------------------------------- pages


def test_pages_are_kilt_pages_with_short_paragraphs_that_name_their_subject(small_dir, pages):
  assert len(list(kilt.read_knowledge_source(small_dir / KS))) == len(pages)
  titles = [page["wikipedia_title"] for page in pages.values()]
  assert len(set(titles)) == len(titles)
  for wid, page in pages.items():
    assert page["_id"] == wid and int(wid) > 0
    title, text = page["wikipedia_title"], page["text"]
    assert 1 <= len(title.split()) <= 2 and text[0] == title + "\n"
    assert all(p.endswith("\n") for p in text)
    for paragraph in text[1:]:
      if paragraph.startswith("Section::::"):
        assert re.fullmatch(r"Section::::[A-Z][a-z ]+\.\n", paragraph)
      else:  # the name is repeated in every paragraph, so a short window keeps fact and subject
        assert title in paragraph and len(paragraph.split()) <= 25, paragraph
    assert set(page["history"]) >= {"revid", "timestamp", "parentid", "pageid", "url"}
    assert page["wikidata_info"]["wikidata_id"].startswith("Q") and isinstance(
        page["categories"], str
    )
    for anchor in page["anchors"]:
      target = pages[anchor["wikipedia_id"]]
      assert anchor["wikipedia_title"] == target["wikipedia_title"] == anchor["text"]
      assert text[anchor["paragraph_id"]][anchor["start"] : anchor["end"]] == anchor["text"]
  assert sum(len(page["anchors"]) for page in pages.values()) > len(pages)


def test_world_has_distractors_siblings_born_elsewhere_and_near_names():
  world = demo_world.build_world(SMALL["seed"], SMALL["num_entities"])
  people = [e for e in world.entities if e.kind == "person"]
  siblings = [p for p in people if "sibling" in p.facts]
  assert len(siblings) > len(people) // 5
  for person in siblings:
    sibling = world.entities[person.facts["sibling"]]
    assert (
        sibling.facts["sibling"] == person.index
        and sibling.name.split()[1] == person.name.split()[1]
    )
    assert sibling.facts["born_in"] != person.facts["born_in"]
  # Same given name, family names equal up to the last syllable's vowel and coda: "Tolan Merik" / "Tolan Merin".
  by_given = collections.defaultdict(list)
  for person in people:
    by_given[person.name.split()[0]].append(person.name.split()[1])
  stem = lambda family: re.sub(r"[aeiou][^aeiou]*$", "", family)  # noqa: E731
  near = [
      g for g, families in by_given.items() if len({stem(f) for f in families}) < len(set(families))
  ]
  assert len(near) >= 5


# ---------------------------------------------------------------- task files


def section_of(text, paragraph_id):
  for paragraph in reversed(text[:paragraph_id]):
    if paragraph.startswith("Section::::"):
      return paragraph.rstrip("\n")
  return "Section::::Abstract."


def test_task_lines_are_kilt_records_with_valid_gold_provenance(small_dir, pages, records):
  ids = set()
  for name, lines in records.items():
    task = name.split("-")[0]
    assert len(list(kilt.read_kilt(small_dir / name, require_answers=True))) == len(lines)
    for record in lines:
      assert set(record) == {"id", "input", "output", "meta"}
      ids.add(record["id"])
      subject = pages[record["meta"]["subject_wikipedia_id"]]
      assert subject["wikipedia_title"] in record["input"]
      assert record["output"][0]["provenance"][0]["wikipedia_id"] == subject["wikipedia_id"]
      for output in record["output"]:
        answer, provenance = output["answer"], output["provenance"]
        assert len(provenance) == (2 if task == "hotpotqa" else 1)
        spans = []
        for prov in provenance:
          page = pages[prov["wikipedia_id"]]
          assert prov["title"] == page["wikipedia_title"] and prov["bleu_score"] == 1.0
          pid = prov["start_paragraph_id"]
          assert pid == prov["end_paragraph_id"] and 1 <= pid < len(page["text"])
          paragraph = page["text"][pid].rstrip("\n")
          assert 0 <= prov["start_character"] < prov["end_character"] <= len(paragraph)
          assert prov["section"] == section_of(page["text"], pid)
          spans.append(paragraph[prov["start_character"] : prov["end_character"]])
        if task == "fever":
          assert answer in ("SUPPORTS", "REFUTES")
        else:  # the answer is stated by the (last hop's) cited sentence
          assert answer in spans[-1] and 1 <= len(answer.split()) <= 3, (record, answer)
        if task == "hotpotqa":
          assert provenance[0]["wikipedia_id"] != provenance[1]["wikipedia_id"]
  assert len(ids) == sum(len(lines) for lines in records.values())


def test_zsre_inputs_are_subject_sep_relation(pages, records):
  titles = {page["wikipedia_title"] for page in pages.values()}
  labels = {relation.label for relation in demo_world.RELATIONS.values()}
  for split in ("train", "dev"):
    for record in records[f"structured_zeroshot-{split}-kilt.jsonl"]:
      subject, label = record["input"].split(" [SEP] ")
      assert subject in titles and label in labels


def asked_pairs(records, split):
  """(subject page, first relation) of every example of every task in `split`."""
  return {
      (r["meta"]["subject_wikipedia_id"], r["meta"]["relations"][0])
      for name, lines in records.items()
      if f"-{split}-" in name
      for r in lines
  }


def test_dev_asks_only_about_pairs_no_train_example_asks_about(pages, records):
  train, dev = asked_pairs(records, "train"), asked_pairs(records, "dev")
  assert dev and not dev & train
  # Symmetric facts are held out both ways: "who did B marry?" in train would answer "who did A marry?".
  id_of = {page["wikipedia_title"]: wid for wid, page in pages.items()}
  for name in ("nq-dev-kilt.jsonl", "structured_zeroshot-dev-kilt.jsonl"):
    for r in records[name]:
      relation = r["meta"]["relations"][0]
      if relation in ("spouse", "sibling"):
        assert (id_of[r["output"][0]["answer"]], relation) not in train
  # Independently of `meta`: the zsRE inputs themselves never repeat across splits.
  zsre = [
      {r["input"] for r in records[f"structured_zeroshot-{s}-kilt.jsonl"]} for s in ("train", "dev")
  ]
  assert not zsre[0] & zsre[1]


def test_fever_is_balanced_and_refuted_claims_swap_in_a_wrong_object(records):
  world = demo_world.build_world(SMALL["seed"], SMALL["num_entities"])
  by_id = {world.page_id(e.index): e for e in world.entities}
  for split, size in (("train", SMALL["train_size"]), ("dev", SMALL["dev_size"])):
    lines = records[f"fever-{split}-kilt.jsonl"]
    labels = collections.Counter(r["output"][0]["answer"] for r in lines)
    assert labels == {"SUPPORTS": size - size // 2, "REFUTES": size // 2}
    for r in lines:
      subject = by_id[r["meta"]["subject_wikipedia_id"]]
      (relation,) = r["meta"]["relations"]
      true_claim = demo_world.RELATIONS[relation].claim.format(
          s=subject.name, o=world.value_text(relation, subject.facts[relation])
      )
      assert (r["input"] == true_claim) == (r["output"][0]["answer"] == "SUPPORTS"), r


def test_default_size_meets_the_promised_sizes(tmp_path):
  manifest, written = demo.write_demo(str(tmp_path))
  assert written
  assert manifest["files"][KS]["lines"] >= 2000
  for name in TASK_FILES:
    assert manifest["files"][name]["lines"] >= (5000 if "-train-" in name else 500)


# ---------------------------------------------------------------- manifest, reruns, interruptions


def test_rerun_with_same_settings_skips_and_other_settings_regenerate(tmp_path, caplog):
  out = str(tmp_path)
  demo.main(["--out", out, *(f"--{k}={v}" for k, v in SMALL.items())])
  before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
  with caplog.at_level(logging.INFO, logger=demo.logger.name):
    manifest, written = demo.write_demo(out, **SMALL)
  assert not written and "up to date" in caplog.text
  assert before == {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
  manifest, written = demo.write_demo(out, **{**SMALL, "dev_size": 50})
  assert written and len(read_jsonl(tmp_path / "nq-dev-kilt.jsonl")) == 50


def test_partial_or_corrupted_directory_is_regenerated(small_dir, tmp_path):
  out = str(tmp_path)
  demo.write_demo(out, **SMALL)
  # Interrupted before the manifest: a truncated file, no manifest.
  os.remove(tmp_path / "demo_manifest.json")
  with open(tmp_path / "nq-train-kilt.jsonl", "r+b") as f:
    f.truncate(100)
  assert demo.write_demo(out, **SMALL)[1]
  assert hashes(out) == hashes(small_dir)
  # A file changed after a complete run: its hash no longer matches the manifest.
  with open(tmp_path / "fever-dev-kilt.jsonl", "ab") as f:
    f.write(b"{}\n")
  assert demo.write_demo(out, **SMALL)[1]
  assert hashes(out) == hashes(small_dir)


def test_interrupted_write_leaves_no_manifest_and_no_temporary_files(
    small_dir, tmp_path, monkeypatch
):
  out = str(tmp_path)
  demo.write_demo(out, **SMALL)
  real = demo.demo_records

  def interrupted(world, train_size, dev_size):
    files = real(world, train_size, dev_size)

    def cut(lines):
      yield from lines[:10]
      raise KeyboardInterrupt

    files["hotpotqa-train-kilt.jsonl"] = cut(files["hotpotqa-train-kilt.jsonl"])
    return files

  monkeypatch.setattr(demo, "demo_records", interrupted)
  with pytest.raises(KeyboardInterrupt):
    demo.write_demo(out, **{**SMALL, "seed": 5})
  assert not os.path.exists(tmp_path / "demo_manifest.json")
  assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
  assert (
      len(read_jsonl(tmp_path / "hotpotqa-train-kilt.jsonl")) == SMALL["train_size"]
  )  # the old, whole file
  monkeypatch.setattr(demo, "demo_records", real)
  assert demo.write_demo(out, **SMALL)[1]
  assert hashes(out) == hashes(small_dir)


def test_bad_settings_name_the_flag(tmp_path, capsys):
  with pytest.raises(ValueError, match="--num_entities must be at least 50"):
    demo.write_demo(str(tmp_path), num_entities=10)
  demo.write_demo(str(tmp_path), num_entities=100, train_size=20, dev_size=10)
  before = hashes(tmp_path)
  with pytest.raises(ValueError, match=r"only \d+ candidates for nq train.*raise --num_entities"):
    demo.write_demo(str(tmp_path), num_entities=100, train_size=100_000, dev_size=10)
  assert hashes(tmp_path) == before and os.path.exists(tmp_path / "demo_manifest.json")
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--out", str(tmp_path), "--dev_size", "0"])
  assert exit_info.value.code == 1 and "--dev_size must be at least 1" in capsys.readouterr().err


def test_files_do_not_depend_on_python_hash_randomisation(small_dir, tmp_path):
  """Set iteration order changes with PYTHONHASHSEED; the in-process test above cannot see that."""
  flags = [f"--{k}={v}" for k, v in SMALL.items()]
  for hash_seed in ("1", "2"):
    out = tmp_path / hash_seed
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(
        [sys.executable, "-m", "lumenvq.data.demo", "--out", str(out), *flags],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        check=True,
        capture_output=True,
    )
    assert hashes(out) == hashes(small_dir)
