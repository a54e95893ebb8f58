"""Passage splitting, sharding-independent ids, the table's lookups and its failure modes."""
import filecmp
import json
import os
import pickle

import pytest

from lumenvq.data import kilt, passages


def _page(wid, title, *paragraphs):
    return {"wikipedia_id": wid, "wikipedia_title": title, "text": [title + "\n", *paragraphs]}


def _numbers(start, n):
    return " ".join(f"w{i}" for i in range(start, start + n))


PAGES = [
    _page("10", "Alpha", f"{_numbers(0, 7)}\n", "Section::::History.\n", f"BULLET::::- {_numbers(7, 5)}\n"),
    _page("11", "Beta", "only four words here\n"),
    _page("12", "Gamma"),  # a title and nothing else: no passages, reported
    _page("13", "Délta", f"{_numbers(0, 4)}\n", "Section::::Notes.\n", f"{_numbers(4, 9)}\n", "\n"),
    _page("14", "Epsilon", f"{_numbers(0, 10)}\n"),
]


def _write(path, pages):
    with open(path, "w", encoding="utf-8") as f:
        for page in pages:
            f.write((page if isinstance(page, str) else json.dumps(page, ensure_ascii=False)) + "\n")
    return str(path)


def _build(tmp_path, name, pages=PAGES, num_shards=1, words=5, **kw):
    source = _write(tmp_path / f"{name}.json", pages)
    passages.build(source, str(tmp_path / name), num_shards=num_shards, words=words, progress=False, **kw)
    return passages.PassageTable(tmp_path / name)


def test_split_page_skips_title_headings_and_bullets_and_keeps_offsets():
    paragraphs = PAGES[0]["text"]
    spans = passages.split_page(paragraphs, words=5)
    assert [s.words for s in spans] == [tuple(f"w{i}" for i in range(j, min(j + 5, 12))) for j in (0, 5, 10)]
    # The second block runs on from paragraph 1 into the bullet of paragraph 3 (2 is a heading).
    assert [(s.start_paragraph_id, s.end_paragraph_id) for s in spans] == [(1, 1), (1, 3), (3, 3)]
    for s in spans:
        assert paragraphs[s.start_paragraph_id][s.start_character:].startswith(s.words[0])
        assert paragraphs[s.end_paragraph_id][:s.end_character].endswith(s.words[-1])
    assert passages.split_page(["Only a title\n", "Section::::A.\n"], words=5) == []


def test_table_records_and_lookups(tmp_path):
    table = _build(tmp_path, "t")
    assert len(table) == 3 + 1 + 0 + 3 + 2 and table.num_pages == 5
    assert table.manifest["pages_without_passages"] == 1
    assert "t.json:3: page 12 has no words" in table.manifest["reports"][0]
    first = table[0]
    assert (first.id, first.wikipedia_id, first.title) == (0, "10", "Alpha")
    assert first.text == "title: Alpha context: w0 w1 w2 w3 w4"
    assert table[3].text == "title: Beta context: only four words here"
    delta = table[4]  # "Délta" p1 w0..w3 + p3 w4: crosses the heading
    assert (delta.title, delta.start_paragraph_id, delta.end_paragraph_id) == ("Délta", 1, 3)
    assert delta.text == "title: Délta context: w0 w1 w2 w3 w4"
    assert [p.id for p in table.get([8, 0, 8])] == [8, 0, 8]
    assert table.text(8) == table[8].text
    assert list(table.iter_texts()) == [table.text(i) for i in range(len(table))]
    assert table.page_passages("13") == range(4, 7) and table.page_passages(12) == range(4, 4)
    assert list(table.passages_for("13", 3)) == [4, 5, 6] and list(table.passages_for("13", 1)) == [4]
    assert list(table.passages_for("13", 2)) == [4]  # a heading inside a passage that runs over it
    assert list(table.passages_for("13", 1, 3)) == [4, 5, 6]
    assert list(table.passages_for("14", 0, 0)) == [7]
    assert list(table.passages_for("10", 0)) == [0]  # the title paragraph: the page's first passage
    assert list(table.passages_for("13", 4)) == [6]  # a trailing empty paragraph: the last passage
    assert list(table.passages_for("13")) == [4, 5, 6]
    with pytest.raises(ValueError, match="page 13 has paragraphs 0..4, not 9..9"):
        table.passages_for("13", 9)
    with pytest.raises(KeyError, match="wikipedia_id 99 is not a page"):
        table.passages_for("99", 1)
    with pytest.raises(ValueError, match="page 12 has no passages"):
        table.passages_for("12", 0)
    assert pickle.loads(pickle.dumps(table))[7] == table[7]


def test_out_of_range_id_names_id_and_size(tmp_path):
    table = _build(tmp_path, "t")
    with pytest.raises(IndexError, match=r"passage id 9 is out of range: .* has 9 passages \(ids 0..8\)"):
        table[9]
    with pytest.raises(IndexError, match="passage id -1 is out of range"):
        table.get([0, -1])
    with pytest.raises(TypeError, match="not an integer"):
        table["3"]


@pytest.mark.parametrize("num_shards", [3, 8])
def test_ids_and_files_do_not_depend_on_sharding(tmp_path, num_shards):
    one, many = _build(tmp_path, "one"), _build(tmp_path, "many", num_shards=num_shards)
    assert len(many.manifest["shards"]) == num_shards
    assert [s["num_pages"] for s in many.manifest["shards"]].count(0) >= num_shards - len(PAGES)
    assert many.get(range(len(many))) == one.get(range(len(one)))
    assert many.fingerprint == one.fingerprint
    cmp = filecmp.dircmp(tmp_path / "one" / "index", tmp_path / "many" / "index")
    assert not cmp.diff_files and not cmp.left_only and len(cmp.same_files) == 4
    assert _build(tmp_path, "words6", words=6).fingerprint != one.fingerprint


def test_page_without_text_is_an_error_naming_file_and_line(tmp_path):
    pages = PAGES[:3] + ["", {"wikipedia_id": "20", "wikipedia_title": "Empty", "text": []}] + PAGES[3:]
    with pytest.raises(kilt.KiltFormatError, match=r"bad\.json:5: page 20 has no text"):
        _build(tmp_path, "bad", pages, num_shards=2)  # line 5 is in the second shard
    assert not os.path.exists(tmp_path / "bad" / passages.MANIFEST)
    table = _build(tmp_path, "skip", pages + ["{not json"], num_shards=2, skip_bad_lines=True)
    assert table.manifest["skipped_lines"] == 2 and len(table) == 9
    reports = "\n".join(table.manifest["reports"])
    assert "skip.json:5: page 20 has no text" in reports and "skip.json:8: not valid JSON" in reports


def test_resume_keeps_finished_shards_and_rebuilds_temporary_ones(tmp_path, monkeypatch):
    source = _write(tmp_path / "ks.json", PAGES)
    out = str(tmp_path / "out")
    passages.build_shard(source, out, 0, 3, words=5, progress=False)
    os.makedirs(os.path.join(out, "shards", ".tmp-" + passages.shard_name(1, 3)))  # a crashed writer's leftover
    with open(os.path.join(out, "shards", ".tmp-" + passages.shard_name(1, 3), "text.bin"), "w") as f:
        f.write("garbage")
    with pytest.raises(FileNotFoundError, match=r"shards \[1, 2\] of 3 are not built"):
        passages.finalize(out, 3)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        passages.PassageTable(out)
    built = []
    real = passages.iter_pages
    monkeypatch.setattr(passages, "iter_pages", lambda path, start, end, skipped: built.append(start) or
                        real(path, start, end, skipped))
    passages.build(source, out, num_shards=3, words=5, progress=False)
    size = os.path.getsize(source)
    assert built == [size // 3, 2 * size // 3]  # shard 0 was kept
    assert not [n for n in os.listdir(os.path.join(out, "shards")) if n.startswith(".tmp")]
    assert passages.PassageTable(out).get(range(9)) == _build(tmp_path, "ref").get(range(9))
    with pytest.raises(ValueError, match="was built with .*use another --out"):
        passages.build_shard(source, out, 0, 3, words=7, progress=False)


def test_duplicate_wikipedia_id_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="wikipedia_id 11 is on two pages"):
        _build(tmp_path, "dup", PAGES + [_page("11", "Beta again", "more words\n")], num_shards=2)


def test_cli_builds_shards_then_finalizes(tmp_path, capsys):
    source = _write(tmp_path / "ks.json", PAGES)
    out = str(tmp_path / "cli")
    for i in range(2):
        passages.main(["--knowledge_source", source, "--out", out, "--words", "5", "--num_shards", "2",
                       "--shard_index", str(i), "--no_progress"])
    passages.main(["--out", out, "--num_shards", "2", "--finalize"])
    assert "9 passages from 5 pages" in capsys.readouterr().out
    assert passages.PassageTable(out).fingerprint == _build(tmp_path, "ref").fingerprint
