"""Passage splitting, sharding-independent ids, resumable shard builds and their failure modes.

The table's own lookups are in passage_table_test; the pages and builders are in conftest.py."""

import filecmp
import os

import pytest

from lumenvq import paths
from lumenvq.data import kilt, passage_table, passages


def test_split_page_skips_title_headings_and_bullets_and_keeps_offsets(table_pages):
  paragraphs = table_pages[0]["text"]
  spans = passages.split_page(paragraphs, words=5)
  assert [s.words for s in spans] == [
      tuple(f"w{i}" for i in range(j, min(j + 5, 12))) for j in (0, 5, 10)
  ]
  # The second block runs on from paragraph 1 into the bullet of paragraph 3 (2 is a heading).
  assert [(s.start_paragraph_id, s.end_paragraph_id) for s in spans] == [(1, 1), (1, 3), (3, 3)]
  for s in spans:
    assert paragraphs[s.start_paragraph_id][s.start_character :].startswith(s.words[0])
    assert paragraphs[s.end_paragraph_id][: s.end_character].endswith(s.words[-1])
  assert passages.split_page(["Only a title\n", "Section::::A.\n"], words=5) == []


@pytest.mark.parametrize("num_shards", [3, 8])
def test_ids_and_files_do_not_depend_on_sharding(tmp_path, build_table, table_pages, num_shards):
  one, many = build_table("one"), build_table("many", num_shards=num_shards)
  assert len(many.manifest["shards"]) == num_shards
  assert [s["num_pages"] for s in many.manifest["shards"]].count(0) >= num_shards - len(table_pages)
  assert many.get(range(len(many))) == one.get(range(len(one)))
  assert many.fingerprint == one.fingerprint
  cmp = filecmp.dircmp(tmp_path / "one" / "index", tmp_path / "many" / "index")
  assert not cmp.diff_files and not cmp.left_only and len(cmp.same_files) == 4
  assert build_table("words6", words=6).fingerprint != one.fingerprint


def test_page_without_text_is_an_error_naming_file_and_line(tmp_path, build_table, table_pages):
  empty = {"wikipedia_id": "20", "wikipedia_title": "Empty", "text": []}
  pages = table_pages[:3] + ["", empty] + table_pages[3:]
  with pytest.raises(kilt.KiltFormatError, match=r"bad\.json:5: page 20 has no text"):
    build_table("bad", pages, num_shards=2)  # line 5 is in the second shard
  assert not os.path.exists(tmp_path / "bad" / passage_table.MANIFEST)
  table = build_table("skip", pages + ["{not json"], num_shards=2, skip_bad_lines=True)
  assert table.manifest["skipped_lines"] == 2 and len(table) == 9
  reports = "\n".join(table.manifest["reports"])
  assert "skip.json:5: page 20 has no text" in reports and "skip.json:8: not valid JSON" in reports


def test_resume_keeps_finished_shards_and_rebuilds_temporary_ones(
    tmp_path, monkeypatch, build_table, write_source, table_pages
):
  source = write_source(tmp_path / "ks.json", table_pages)
  out = str(tmp_path / "out")
  passages.build_shard(source, out, 0, 3, words=5, progress=False)
  os.makedirs(
      os.path.join(out, "shards", ".tmp-" + passages.shard_name(1, 3))
  )  # a crashed writer's leftover
  with open(os.path.join(out, "shards", ".tmp-" + passages.shard_name(1, 3), "text.bin"), "w") as f:
    f.write("garbage")
  with pytest.raises(FileNotFoundError, match=r"shards \[1, 2\] of 3 are not built"):
    passages.finalize(out, 3)
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    passage_table.PassageTable(out)
  built = []
  real = passages.iter_pages
  monkeypatch.setattr(
      passages,
      "iter_pages",
      lambda path, start, end, skipped: built.append(start) or real(path, start, end, skipped),
  )
  passages.build(source, out, num_shards=3, words=5, progress=False)
  size = os.path.getsize(source)
  assert built == [size // 3, 2 * size // 3]  # shard 0 was kept
  assert not [n for n in os.listdir(os.path.join(out, "shards")) if n.startswith(".tmp")]
  assert passage_table.PassageTable(out).get(range(9)) == build_table("ref").get(range(9))
  with pytest.raises(ValueError, match="was built with .*use another --out"):
    passages.build_shard(source, out, 0, 3, words=7, progress=False)


def test_duplicate_wikipedia_id_is_an_error(build_table, table_pages):
  again = {
      "wikipedia_id": "11",
      "wikipedia_title": "Beta again",
      "text": ["Beta again\n", "more words\n"],
  }
  with pytest.raises(ValueError, match="wikipedia_id 11 is on two pages"):
    build_table("dup", table_pages + [again], num_shards=2)


def test_cli_builds_shards_then_finalizes(tmp_path, capsys, build_table, write_source, table_pages):
  source = write_source(tmp_path / "ks.json", table_pages)
  out = str(tmp_path / "cli")
  for i in range(2):
    passages.main(
        [
            "--knowledge_source",
            source,
            "--out",
            out,
            "--words",
            "5",
            "--num_shards",
            "2",
            "--shard_index",
            str(i),
            "--no_progress",
        ]
    )
  passages.main(["--out", out, "--num_shards", "2", "--finalize"])
  assert "9 passages from 5 pages" in capsys.readouterr().out
  assert passage_table.PassageTable(out).fingerprint == build_table("ref").fingerprint


def test_a_table_built_on_gs_equals_the_local_one(
    gcs_bucket, build_table, write_source, table_pages, tmp_path
):
  """Knowledge source and table on the local Cloud Storage server, 3 shards built one process
  each, then finalized: each shard's stats object comes last, the manifest after the index."""
  local = build_table("local", num_shards=3)
  prefix = f"{gcs_bucket}/passages-{os.getpid()}"
  source = f"{prefix}/ks.json"
  paths.upload(write_source(tmp_path / "ks.json", table_pages), source)
  out = f"{prefix}/table"
  common = dict(words=5, progress=False)
  passages.build_shard(source, out, 0, 3, **common)
  with pytest.raises(FileNotFoundError, match=r"shards \[1, 2\] of 3 are not built yet"):
    passages.finalize(out, 3)
  assert not paths.path(out, passage_table.MANIFEST).exists()
  for i in (1, 2):
    passages.build_shard(source, out, i, 3, **common)
  passages.finalize(out, 3)
  remote = passage_table.PassageTable(out)
  assert remote.fingerprint == local.fingerprint
  assert remote.get(range(len(remote))) == local.get(range(len(local)))
  for name in ("passage_page", "page_first", "page_keys", "page_order"):
    local_bytes = (tmp_path / "local" / "index" / f"{name}.npy").read_bytes()
    assert paths.path(out, "index", f"{name}.npy").read_bytes() == local_bytes
  stats = paths.path(out, "shards", passages.shard_name(1, 3), passages.SHARD_STATS)
  written = stats.stat().mtime
  passages.build_shard(source, out, 1, 3, **common)
  assert stats.stat().mtime == written  # A built shard is kept (resume).
