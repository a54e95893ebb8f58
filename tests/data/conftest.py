"""A small knowledge source shaped to exercise passage splitting and table lookups, shared by
passages_test (the builder) and passage_table_test (the reader) as fixtures."""

import json

import pytest

from lumenvq.data import passage_table, passages


def _page(wid, title, *paragraphs):
  return {"wikipedia_id": wid, "wikipedia_title": title, "text": [title + "\n", *paragraphs]}


def _numbers(start, n):
  return " ".join(f"w{i}" for i in range(start, start + n))


PAGES = [
    _page(
        "10",
        "Alpha",
        f"{_numbers(0, 7)}\n",
        "Section::::History.\n",
        f"BULLET::::- {_numbers(7, 5)}\n",
    ),
    _page("11", "Beta", "only four words here\n"),
    _page("12", "Gamma"),  # a title and nothing else: no passages, reported
    _page("13", "Délta", f"{_numbers(0, 4)}\n", "Section::::Notes.\n", f"{_numbers(4, 9)}\n", "\n"),
    _page("14", "Epsilon", f"{_numbers(0, 10)}\n"),
]


@pytest.fixture
def table_pages():
  """A fresh copy of PAGES: 5 pages (a heading, a bullet, a title-only page, a trailing empty paragraph)."""
  return json.loads(json.dumps(PAGES))


@pytest.fixture
def write_source(tmp_path):
  """write_source(path, pages) -> path: pages (dicts, or raw strings for bad lines) one per line."""

  def write(path, pages):
    with open(path, "w", encoding="utf-8") as f:
      for page in pages:
        f.write((page if isinstance(page, str) else json.dumps(page, ensure_ascii=False)) + "\n")
    return str(path)

  return write


@pytest.fixture
def build_table(tmp_path, write_source):
  """build_table(name, pages=PAGES, num_shards=1, words=5, **build_kwargs) -> PassageTable in tmp_path/name."""

  def build(name, pages=PAGES, num_shards=1, words=5, **kw):
    source = write_source(tmp_path / f"{name}.json", pages)
    passages.build(
        source, str(tmp_path / name), num_shards=num_shards, words=words, progress=False, **kw
    )
    return passage_table.PassageTable(tmp_path / name)

  return build
