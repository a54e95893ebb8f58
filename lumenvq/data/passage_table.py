"""The read side of the passage table that `lumenvq.data.passages` builds (layout in its docstring).

`PassageTable` serves passage texts, spans, pages and KILT-provenance lookups by
passage id. It lives apart from the builder so that readers (retrieval, the
SeqIO tasks, the memory precompute) import numpy alone, not the builder and
its CLI.

A local table is memory-mapped; a gs:// one (`lumenvq.paths`) loads its index arrays
and reads passage texts and pages by ranged reads of the shard files.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lumenvq import paths

FORMAT_VERSION = (
    1  # of the on-disk layout; the builder writes it into the manifest, the reader checks it
)
MANIFEST = "manifest.json"  # written last by the builder: the table exists once it is there


@dataclasses.dataclass(frozen=True)
class Passage:
  """One passage; `text` is already title-prefixed (manifest `passage_format`)."""

  id: int
  wikipedia_id: str
  title: str
  text: str
  start_paragraph_id: int
  end_paragraph_id: int
  start_character: int
  end_character: int


class _Shard:

  def __init__(self, directory: str):
    self.text_offsets, self.spans = load_array(directory, "text_offsets.npy"), load_array(
        directory, "spans.npy"
    )
    self.page_offsets = load_array(directory, "page_offsets.npy")
    self.text, self.pages = (open_blob(paths.join(directory, n)) for n in ("text.bin", "pages.bin"))


def load_array(directory: str, name: str) -> np.ndarray:
  """A .npy array: memory-mapped when local, read whole when remote."""
  path = paths.join(directory, name)
  if not paths.is_remote(path):
    return np.load(path, mmap_mode="r")
  with paths.path(path).open("rb") as f:
    return np.load(f)


# A remote shard file up to this size is read whole when opened: one request, where ranged
# reads cost a round trip per passage (on Cloud Storage tens of ms, most of a lookup), as
# load_array reads a remote .npy whole. Larger files (a corpus in few shards) stay ranged.
WHOLE_READ_BYTES = 64 << 20


def open_blob(path: str, whole_read_bytes: int = WHOLE_READ_BYTES):
  """The bytes of a shard file, sliceable: a memory map when local; when remote, the whole
  file in memory up to `whole_read_bytes`, else ranged reads."""
  if paths.is_remote(path):
    remote = paths.path(path)
    if remote.stat().length <= whole_read_bytes:
      return np.frombuffer(remote.read_bytes(), np.uint8)
    return _RangedBlob(path)
  # np.memmap refuses empty files (a shard may hold no pages).
  return np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)


class _RangedBlob:
  """`blob[start:stop]` -> bytes of a remote file, through one open file (seek + read)."""

  def __init__(self, path: str):
    self._file = paths.path(path).open("rb")
    self._lock = threading.Lock()  # seek + read of one file is not thread-safe.

  def __getitem__(self, item: slice) -> bytes:
    start, stop = int(item.start), int(item.stop)
    with self._lock:
      self._file.seek(start)
      return self._file.read(stop - start)


def by_shard(starts: np.ndarray, passage_ids, where: Callable[[int], str]) -> Iterator[tuple]:
  """(shard, positions in the flattened `passage_ids`, ids within the shard) for each shard
  that the ids other than -1 fall in; `starts` are the shards' first ids and the total.
  IndexError naming the first id out of range, then `where(total)`."""
  flat = np.asarray(passage_ids, np.int64).reshape(-1)
  total = int(starts[-1])
  bad = (flat < -1) | (flat >= total)
  if bad.any():
    raise IndexError(f"passage id {int(flat[bad][0])} is out of range: {where(total)}")
  real = np.flatnonzero(flat >= 0)
  shards = np.searchsorted(starts, flat[real], side="right") - 1
  for s in np.unique(shards):
    here = real[shards == s]
    yield int(s), here, flat[here] - int(starts[s])


class PassageTable:
  """Read-only passage table: `len`, `table[id]`, `get(ids)`, page and provenance lookups.

  Everything is memory-mapped and opened lazily, so a table is cheap to
  create in every worker process and pickles as its directory name.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    path = paths.join(self.directory, MANIFEST)
    if not paths.path(path).exists():
      raise FileNotFoundError(
          f"{self.directory} is not a finished passage table: {MANIFEST} is missing "
          "(build it with python -m lumenvq.data.passages, which finalizes last)"
      )
    self.manifest: dict[str, Any] = json.loads(paths.path(path).read_text())
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(
          f"{path} has format_version {self.manifest.get('format_version')}; this code reads "
          f"{FORMAT_VERSION}: rebuild the table"
      )
    shards = self.manifest["shards"]
    self._passage_starts = np.cumsum([0] + [s["num_passages"] for s in shards])
    self._page_starts = np.cumsum([0] + [s["num_pages"] for s in shards])
    self._shards: list[_Shard | None] = [None] * len(shards)
    index = paths.join(self.directory, "index")
    load = lambda name: load_array(index, name)  # noqa: E731
    self._passage_page, self._page_first = load("passage_page.npy"), load("page_first.npy")
    self._page_keys, self._page_order = load("page_keys.npy"), load("page_order.npy")

  def __getstate__(self):
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

  def __len__(self) -> int:
    return int(self.manifest["num_passages"])

  def __repr__(self) -> str:
    return f"PassageTable({self.directory!r}, passages={len(self)}, fingerprint={self.fingerprint[:12]})"

  @property
  def fingerprint(self) -> str:
    """sha256 of the content (texts, spans, pages, settings); equal for any sharding."""
    return self.manifest["fingerprint"]

  @property
  def num_pages(self) -> int:
    return int(self.manifest["num_pages"])

  def _shard(self, s: int) -> _Shard:
    if self._shards[s] is None:
      self._shards[s] = _Shard(
          paths.join(self.directory, "shards", self.manifest["shards"][s]["name"])
      )
    return self._shards[s]

  def _check(self, passage_id) -> int:
    try:
      pid = operator.index(passage_id)
    except TypeError:
      raise TypeError(f"passage id {passage_id!r} is not an integer") from None
    if not 0 <= pid < len(self):
      raise IndexError(
          f"passage id {pid} is out of range: the table {self.directory} has "
          f"{len(self)} passages (ids 0..{len(self) - 1})"
      )
    return pid

  def _locate(self, pid: int) -> tuple[_Shard, int]:
    s = int(np.searchsorted(self._passage_starts, pid, side="right")) - 1
    return self._shard(s), pid - int(self._passage_starts[s])

  def text(self, passage_id) -> str:
    shard, i = self._locate(self._check(passage_id))
    return bytes(shard.text[shard.text_offsets[i] : shard.text_offsets[i + 1]]).decode("utf-8")

  def page(self, page_index: int) -> tuple[str, str, int]:
    """(wikipedia_id, title, number of paragraphs) of the page at `page_index` (file order)."""
    s = int(np.searchsorted(self._page_starts, page_index, side="right")) - 1
    shard, i = self._shard(s), page_index - int(self._page_starts[s])
    wid, title, paragraphs = json.loads(
        bytes(shard.pages[shard.page_offsets[i] : shard.page_offsets[i + 1]])
    )
    return wid, title, paragraphs

  def texts(self, passage_ids: np.ndarray) -> np.ndarray:
    """The UTF-8 bytes of each passage (an object array), b"" for a -1 id: the input
    pipeline's lookup, located in one vectorised step and never decoded."""
    out = np.full(np.shape(passage_ids), b"", object)
    where = lambda n: f"the table {self.directory} has {n} passages (ids 0..{n - 1})"  # noqa: E731
    for s, here, local in by_shard(self._passage_starts, passage_ids, where):
      shard = self._shard(s)
      starts, stops = shard.text_offsets[local], shard.text_offsets[local + 1]
      for j, a, b in zip(here.tolist(), starts.tolist(), stops.tolist()):
        out.flat[j] = bytes(shard.text[a:b])
    return out

  def passage_page(self, passage_id) -> int:
    """The page (file order, for `page`) a passage was cut from."""
    return int(self._passage_page[self._check(passage_id)])

  def __getitem__(self, passage_id) -> Passage:
    pid = self._check(passage_id)
    shard, i = self._locate(pid)
    wid, title, _ = self.page(self.passage_page(pid))
    sp, ep, sc, ec = (int(v) for v in shard.spans[i])
    return Passage(pid, wid, title, self.text(pid), sp, ep, sc, ec)

  def get(self, passage_ids: Iterable[int]) -> list[Passage]:
    return [self[i] for i in passage_ids]

  def iter_texts(self) -> Iterator[str]:
    """Every passage text in id order, read shard by shard (for indexing the corpus)."""
    for s in range(len(self._shards)):
      shard = self._shard(s)
      offsets = np.asarray(shard.text_offsets)
      for i in range(len(offsets) - 1):
        yield bytes(shard.text[offsets[i] : offsets[i + 1]]).decode("utf-8")

  def page_index(self, wikipedia_id: str | int) -> int | None:
    """The page (file order) with this wikipedia_id, or None."""
    key = str(wikipedia_id).strip().encode("utf-8")
    i = int(np.searchsorted(self._page_keys, key))
    if i < len(self._page_keys) and self._page_keys[i] == key:
      return int(self._page_order[i])
    return None

  def page_passages(self, wikipedia_id: str | int) -> range:
    """Ids of the passages of a page; KeyError naming the id when the page is unknown."""
    page = self.page_index(wikipedia_id)
    if page is None:
      raise KeyError(
          f"wikipedia_id {wikipedia_id} is not a page of the passage table {self.directory}"
      )
    return range(int(self._page_first[page]), int(self._page_first[page + 1]))

  def passages_for(
      self,
      wikipedia_id: str | int,
      start_paragraph_id: int | None = None,
      end_paragraph_id: int | None = None,
  ) -> np.ndarray:
    """Passage ids covering KILT provenance (a page, optionally a paragraph range).

    No paragraph: every passage of the page. Otherwise the passages that
    overlap [start, end]; a range with no words (the title paragraph 0, a
    heading) maps to the next passage, or the page's last one. KeyError
    for an unknown page, ValueError for a paragraph the page does not have.
    """
    ids = self.page_passages(wikipedia_id)
    if not len(ids):
      raise ValueError(
          f"page {wikipedia_id} has no passages (no words besides its title and headings)"
      )
    if start_paragraph_id is None:
      return np.arange(ids.start, ids.stop)
    end = start_paragraph_id if end_paragraph_id is None else end_paragraph_id
    paragraphs = self.page(self.page_index(wikipedia_id))[2]
    if not 0 <= start_paragraph_id <= end < paragraphs:
      raise ValueError(
          f"page {wikipedia_id} has paragraphs 0..{paragraphs - 1}, "
          f"not {start_paragraph_id}..{end}"
      )
    shard, i = self._locate(ids.start)
    spans = np.asarray(shard.spans[i : i + len(ids)])
    hit = np.flatnonzero((spans[:, 0] <= end) & (spans[:, 1] >= start_paragraph_id))
    if not len(hit):
      after = np.flatnonzero(spans[:, 0] > end)
      hit = after[:1] if len(after) else np.array([len(ids) - 1])
    return ids.start + hit
