"""The passage table's lookups (ids, pages, KILT provenance), pickling and its errors."""

import json
import os
import pickle

import numpy as np
import pytest

from lumenvq import paths
from lumenvq.data import passage_table


def test_table_records_and_lookups(build_table):
  table = build_table("t")
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


def test_out_of_range_id_names_id_and_size(build_table):
  table = build_table("t")
  with pytest.raises(
      IndexError, match=r"passage id 9 is out of range: .* has 9 passages \(ids 0..8\)"
  ):
    table[9]
  with pytest.raises(IndexError, match="passage id -1 is out of range"):
    table.get([0, -1])
  with pytest.raises(TypeError, match="not an integer"):
    table["3"]


def test_texts_are_the_passages_bytes_and_empty_for_minus_one(build_table):
  table = build_table("t")
  ids = np.array([[8, -1, 0], [4, 4, 3]])
  got = table.texts(ids)
  assert got.shape == (2, 3) and got.dtype == object
  want = [[table.text(i).encode() if i >= 0 else b"" for i in row] for row in ids.tolist()]
  assert got.tolist() == want
  with pytest.raises(IndexError, match=r"passage id 9 is out of range: .* has 9 passages"):
    table.texts(np.array([0, 9]))
  with pytest.raises(IndexError, match="passage id -2 is out of range"):
    table.texts(np.array([-2]))


def test_unfinished_or_other_version_table_is_refused(build_table, tmp_path):
  table = build_table("t")
  path = os.path.join(table.directory, passage_table.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  with open(path, "w") as f:
    json.dump({**manifest, "format_version": 99}, f)
  with pytest.raises(
      ValueError, match=r"manifest.json has format_version 99; .* rebuild the table"
  ):
    passage_table.PassageTable(table.directory)
  os.remove(path)
  with pytest.raises(
      FileNotFoundError, match=r"t is not a finished passage table: manifest.json is missing"
  ):
    passage_table.PassageTable(tmp_path / "t")


@pytest.mark.parametrize("whole_read_bytes", [passage_table.WHOLE_READ_BYTES, 0])
def test_a_remote_blob_read_whole_or_by_ranges_gives_the_file_bytes(gcs_bucket, whole_read_bytes):
  """Up to the threshold a remote shard file is one read (an array); above it, a ranged read
  per slice: the same bytes either way."""
  data = bytes(range(256)) * 40
  path = f"{gcs_bucket}/blob-{os.getpid()}-{whole_read_bytes}/text.bin"
  paths.path(path).parent.mkdir(parents=True, exist_ok=True)
  paths.path(path).write_bytes(data)
  blob = passage_table.open_blob(path, whole_read_bytes)
  assert isinstance(blob, np.ndarray) == (whole_read_bytes > 0)
  for start, stop in ((0, 1), (250, 9000), (10239, 10240), (5, 5)):
    assert bytes(blob[start:stop]) == data[start:stop]
