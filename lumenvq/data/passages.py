"""Knowledge source -> passages with stable integer ids, in a memory-mapped table (the builder).

    python -m lumenvq.data.passages --knowledge_source kilt_knowledgesource.json --out DIR \
        [--words 100] [--num_shards S [--shard_index i | --processes P]] [--finalize]

Splitting. KILT's own DPR passages (facebookresearch/KILT,
scripts/create_kilt_data_paragraphs.py) drop paragraph 0 (the page title) and
every `Section::::` heading line, then cut ~100 spaCy tokens inside paragraphs;
the original DPR corpus (Karpukhin et al., 2020) cuts each article into
disjoint 100-word blocks and encodes the title with each. We keep KILT's skips
and DPR's blocks: whitespace-separated words of one page run on across
paragraphs (and sections) into blocks of `words` words, the page's last block
may be shorter, blocks never cross pages, and a leading `BULLET::::-` list
marker is not a word. Every passage keeps the paragraph range and character
offsets (start in its first paragraph, end in its last) it was cut from, so
KILT provenance maps onto passages. Its text is `passage_format` filled with
the title and the words, by default `title: {title} context: {text}` (the
FiD/LUMEN reader convention).

Ids. Shard i of S takes the pages whose line starts in bytes
[i*B//S, (i+1)*B//S) of the file (B its size): shards are contiguous runs of
pages, built by independent processes without a counting pass. `finalize`
numbers passages in file order (prefix sums of the shards' counts), so ids,
texts and the fingerprint do not depend on S.

Format. Offsets (.npy, memory-mapped) into UTF-8 blobs: any id is read in O(1)
with numpy alone, processes share it through the page cache, and each shard
is written sequentially by one process. (array_record adds per-record framing
and compression we do not need, parquet reads whole row groups, tensorstore
has no variable-length strings.)

    DIR/manifest.json               written last: the table exists once it is there
    DIR/shards/shard-00000-of-00004/ renamed from .tmp-* once complete; a rerun skips it
        text.bin, text_offsets.npy    passage texts, int64[n+1]
        spans.npy                     int32[n, 4]: start/end paragraph id, start/end character
        pages.bin, page_offsets.npy   JSON [wikipedia_id, title, number of paragraphs] per page
        page_counts.npy, stats.json   int32[P] passages per page; counts, settings, skipped lines
    DIR/index/ passage_page.npy (int32[N] page of each passage), page_first.npy (int64[P+1]),
               page_keys.npy (sorted wikipedia ids, bytes), page_order.npy (their pages)

Reading: `lumenvq.data.passage_table.PassageTable`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tqdm

from lumenvq import paths
from lumenvq.data import kilt
from lumenvq.data.passage_table import FORMAT_VERSION, MANIFEST

logger = logging.getLogger(__name__)

DEFAULT_WORDS = 100
DEFAULT_FORMAT = "title: {title} context: {text}"
SECTION_MARK = "Section::::"  # KILT heading lines; KILT's DPR script tests `in`, so do we
_BULLET = re.compile(
    r"BULLET::::-?"
)  # KILT list items: "BULLET::::- item"; the marker is not a word
_WORD = re.compile(r"\S+")
_MAX_REPORTED = 10
_CHUNK = 1 << 24
SHARD_STATS = "stats.json"  # A shard's summary, and its commit marker (`_shard_built`).


# ----------------------------------------------------------------------------
# Reading pages of a byte range.


def line_numbers(path: str, offsets: Sequence[int]) -> list[int]:
  """1-based line numbers of byte offsets, by counting newlines (used only to report)."""
  result, count, pos = [], 0, 0
  with paths.path(path).open("rb") as f:
    for offset in sorted(offsets):
      while pos < offset:
        chunk = f.read(min(_CHUNK, offset - pos))
        if not chunk:
          break
        count, pos = count + chunk.count(b"\n"), pos + len(chunk)
      result.append((offset, count + 1))
  found = dict(result)
  return [found[o] for o in offsets]


def iter_pages(
    path: str, start: int = 0, end: int | None = None, skipped: list | None = None
) -> Iterator[tuple[int, kilt.KnowledgePage]]:
  """(byte offset, page) for the lines of `path` whose first byte is in [start, end).

  A bad line raises `kilt.KiltFormatError` (file:line), or, when `skipped`
  is a list, is appended to it as (byte offset, reason) and passed over.
  Lines are parsed by `kilt.parse_knowledge_page`; the byte range is what
  lets shards read only their part of the 35 GB file.
  """
  end = paths.path(path).stat().length if end is None else end
  with paths.path(path).open("rb") as f:
    pos = start
    if start > 0:
      f.seek(start - 1)
      if f.read(1) != b"\n":  # mid-line: that line belongs to the previous range
        pos += len(f.readline())
    while pos < end:
      raw = f.readline()
      if not raw:
        break
      offset, pos = pos, pos + len(raw)
      if not raw.strip():
        continue
      try:
        yield offset, kilt.parse_knowledge_page(json.loads(raw))  # json.loads(bytes) handles a BOM
        continue
      except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        reason = f"not valid JSON ({str(err)[:120]})"
      except kilt.BadLine as err:
        reason = str(err)
      if skipped is None:
        raise kilt.KiltFormatError(path, line_numbers(path, [offset])[0], reason)
      skipped.append((offset, reason))


# ----------------------------------------------------------------------------
# Splitting.


@dataclasses.dataclass(frozen=True)
class Span:
  """Where a passage's words come from in its page (paragraph ids index `text`)."""

  start_paragraph_id: int
  end_paragraph_id: int
  start_character: int  # in the start paragraph
  end_character: int  # in the end paragraph, exclusive
  words: tuple[str, ...]


def content_start(paragraph: str) -> int | None:
  """Where a paragraph's words start, or None for a heading line (skipped like KILT's DPR)."""
  if SECTION_MARK in paragraph:
    return None
  bullet = _BULLET.match(paragraph)
  return bullet.end() if bullet else 0


def split_page(paragraphs: Sequence[str], words: int = DEFAULT_WORDS) -> list[Span]:
  """Cut a page's paragraphs (paragraph 0 is the title) into blocks of `words` words."""
  if words < 1:
    raise ValueError(f"words must be >= 1, got {words}")
  spans: list[Span] = []
  buffer: list[tuple[int, re.Match]] = []

  def flush():
    (first, m0), (last, m1) = buffer[0], buffer[-1]
    spans.append(Span(first, last, m0.start(), m1.end(), tuple(m.group() for _, m in buffer)))
    buffer.clear()

  for pid in range(1, len(paragraphs)):
    start = content_start(paragraphs[pid])
    if start is None:
      continue
    for match in _WORD.finditer(paragraphs[pid], start):
      buffer.append((pid, match))
      if len(buffer) == words:
        flush()
  if buffer:
    flush()
  return spans


# ----------------------------------------------------------------------------
# Building shards.


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}"


def _settings(knowledge_source: str, words: int, passage_format: str, num_shards: int) -> dict:
  if words < 1:
    raise ValueError(f"--words must be >= 1, got {words}")
  try:
    passage_format.format(title="t", text="w")
  except (KeyError, IndexError, ValueError) as err:
    raise ValueError(
        f"passage_format {passage_format!r} must use only {{title}} and {{text}} ({err})"
    ) from None
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  return {
      "format_version": FORMAT_VERSION,
      "words": words,
      "passage_format": passage_format,
      "num_shards": num_shards,
      "source_size": paths.path(knowledge_source).stat().length,
  }


def _save(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array)


def build_shard(
    knowledge_source: str,
    out_dir: str,
    shard_index: int,
    num_shards: int = 1,
    words: int = DEFAULT_WORDS,
    passage_format: str = DEFAULT_FORMAT,
    skip_bad_lines: bool = False,
    progress: bool = True,
) -> dict:
  """Write one shard under a temporary name and rename it; returns its stats.

  A shard already complete with the same settings is kept (resume); one
  built with other settings is an error; a leftover temporary one is rebuilt.
  """
  settings = _settings(knowledge_source, words, passage_format, num_shards)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
  name = shard_name(shard_index, num_shards)
  final = paths.join(out_dir, "shards", name)
  if _shard_built(final):
    stats = json.loads(paths.path(final, SHARD_STATS).read_text())
    if stats["settings"] != settings:
      raise ValueError(
          f"{final} was built with {stats['settings']}, not {settings}: "
          "use another --out or delete it"
      )
    return stats
  tmp = paths.staging_dir(final)  # Local; published by `paths.publish_dir` below.
  size = settings["source_size"]
  start, end = size * shard_index // num_shards, size * (shard_index + 1) // num_shards
  skipped: list = [] if skip_bad_lines else None
  text_offsets, spans, page_offsets, page_counts = [0], [], [0], []
  empty_pages = []
  bar = tqdm.tqdm(
      desc=f"passages {name}", unit="page", unit_scale=True, disable=not progress, mininterval=2
  )
  with open(os.path.join(tmp, "text.bin"), "wb") as text_out, open(
      os.path.join(tmp, "pages.bin"), "wb"
  ) as pages_out:
    for offset, page in iter_pages(knowledge_source, start, end, skipped):
      page_spans = split_page(page.paragraphs, words)
      if not page_spans:
        empty_pages.append((offset, page.wikipedia_id))
      for span in page_spans:
        data = passage_format.format(title=page.title, text=" ".join(span.words)).encode("utf-8")
        text_out.write(data)
        text_offsets.append(text_offsets[-1] + len(data))
        spans.append(
            (
                span.start_paragraph_id,
                span.end_paragraph_id,
                span.start_character,
                span.end_character,
            )
        )
      data = (
          json.dumps([page.wikipedia_id, page.title, len(page.paragraphs)], ensure_ascii=False)
          + "\n"
      ).encode()
      pages_out.write(data)
      page_offsets.append(page_offsets[-1] + len(data))
      page_counts.append(len(page_spans))
      bar.update(1)
  bar.close()
  _save(os.path.join(tmp, "text_offsets.npy"), np.asarray(text_offsets, np.int64))
  _save(os.path.join(tmp, "spans.npy"), np.asarray(spans, np.int32).reshape(-1, 4))
  _save(os.path.join(tmp, "page_offsets.npy"), np.asarray(page_offsets, np.int64))
  _save(os.path.join(tmp, "page_counts.npy"), np.asarray(page_counts, np.int32))
  bad = skipped or []
  lines = line_numbers(
      knowledge_source,
      [o for o, _ in bad[:_MAX_REPORTED]] + [o for o, _ in empty_pages[:_MAX_REPORTED]],
  )
  stats = {
      "settings": settings,
      "byte_range": [start, end],
      "num_pages": len(page_counts),
      "num_passages": len(spans),
      "skipped_lines": len(bad),
      "skipped": [
          f"{knowledge_source}:{line}: {why}" for line, (_, why) in zip(lines, bad[:_MAX_REPORTED])
      ],
      "pages_without_passages": len(empty_pages),
      "without_passages": [
          f"{knowledge_source}:{line}: page {wid} has no words besides its title and headings"
          for line, (_, wid) in zip(lines[len(bad[:_MAX_REPORTED]) :], empty_pages)
      ],
  }
  with open(os.path.join(tmp, SHARD_STATS), "w") as f:
    json.dump(stats, f, indent=1)
  paths.publish_dir(tmp, final, SHARD_STATS)
  if bad:
    logger.warning("%s: skipped %d bad line(s); first: %s", name, len(bad), stats["skipped"][0])
  if empty_pages:
    logger.warning(
        "%s: %d page(s) without passages; first: %s",
        name,
        len(empty_pages),
        stats["without_passages"][0],
    )
  return stats


# ----------------------------------------------------------------------------
# Finalize: global index, fingerprint, manifest.


def _shard_built(shard_dir: str) -> bool:
  """Its stats are its commit marker: renamed in with the whole directory (local) or
  uploaded after every other file of it (object store)."""
  return paths.path(shard_dir, SHARD_STATS).exists()


def _read_bytes(path: str) -> Iterator[bytes]:
  with paths.path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      yield chunk


def _load_npy(path: str) -> np.ndarray:
  with paths.path(path).open("rb") as f:
    return np.load(f)


def _replace_npy(path: str, array: np.ndarray) -> None:
  with paths.atomic_open(path, "wb") as f:
    np.save(f, array)


def finalize(out_dir: str, num_shards: int) -> dict:
  """Check that all shards are there and agree, write the index and then the manifest."""
  shard_dirs = [paths.join(out_dir, "shards", shard_name(i, num_shards)) for i in range(num_shards)]
  missing = [i for i, d in enumerate(shard_dirs) if not _shard_built(d)]
  if missing:
    raise FileNotFoundError(
        f"{out_dir}: shards {missing[:20]} of {num_shards} are not built yet "
        "(run with --shard_index for each)"
    )
  manifest_path = paths.join(out_dir, MANIFEST)
  paths.path(manifest_path).unlink(missing_ok=True)  # Invalid while its index is rewritten.
  stats = [json.loads(paths.path(d, SHARD_STATS).read_text()) for d in shard_dirs]
  for d, s in zip(shard_dirs, stats):
    if s["settings"] != stats[0]["settings"]:
      raise ValueError(f"{d} was built with {s['settings']}, shard 0 with {stats[0]['settings']}")
  shard_counts = [_load_npy(paths.join(d, "page_counts.npy")) for d in shard_dirs]
  counts = np.concatenate(shard_counts).astype(np.int64)
  num_pages = len(counts)
  page_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  # Content fingerprint: streams whose concatenation over shards is independent of the sharding.
  streams = {k: hashlib.sha256() for k in ("text", "lengths", "spans", "pages", "page_counts")}
  wids: list[bytes] = []
  for d in shard_dirs:  # Each shard's pages read once (a download on gs://): ids and hash.
    pages = paths.path(d, "pages.bin").read_bytes()
    streams["pages"].update(pages)
    wids.extend(json.loads(line)[0].encode("utf-8") for line in pages.split(b"\n") if line)
  keys = np.array(wids, dtype=bytes) if wids else np.zeros(0, "S1")
  order = np.argsort(keys, kind="stable")
  sorted_keys = keys[order]
  dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
  if len(dup):
    i = dup[0]
    raise ValueError(
        f"wikipedia_id {sorted_keys[i].decode()} is on two pages of the knowledge source "
        f"(pages {order[i]} and {order[i + 1]} in file order)"
    )
  index_dir = os.fspath(paths.makedirs(paths.join(out_dir, "index")))
  _replace_npy(
      os.path.join(index_dir, "passage_page.npy"),
      np.repeat(np.arange(num_pages, dtype=np.int32), counts),
  )
  _replace_npy(os.path.join(index_dir, "page_first.npy"), page_first)
  _replace_npy(os.path.join(index_dir, "page_keys.npy"), sorted_keys)
  _replace_npy(os.path.join(index_dir, "page_order.npy"), order.astype(np.int64))

  for d, page_counts in zip(shard_dirs, shard_counts):
    for chunk in _read_bytes(paths.join(d, "text.bin")):
      streams["text"].update(chunk)
    streams["lengths"].update(
        np.diff(_load_npy(paths.join(d, "text_offsets.npy"))).astype("<i8").tobytes()
    )
    streams["spans"].update(_load_npy(paths.join(d, "spans.npy")).astype("<i4").tobytes())
    streams["page_counts"].update(page_counts.astype("<i4").tobytes())
  settings = {
      k: v for k, v in stats[0]["settings"].items() if k not in ("num_shards", "source_size")
  }
  fingerprint = hashlib.sha256(
      json.dumps(
          {"settings": settings, **{k: h.hexdigest() for k, h in streams.items()}}, sort_keys=True
      ).encode()
  ).hexdigest()
  manifest = {
      **settings,
      "fingerprint": fingerprint,
      "num_passages": int(page_first[-1]),
      "num_pages": num_pages,
      "num_shards": num_shards,
      "source_size": stats[0]["settings"]["source_size"],
      "shards": [
          {
              "name": os.path.basename(d),
              "num_passages": s["num_passages"],
              "num_pages": s["num_pages"],
          }
          for d, s in zip(shard_dirs, stats)
      ],
      "skipped_lines": sum(s["skipped_lines"] for s in stats),
      "pages_without_passages": sum(s["pages_without_passages"] for s in stats),
      "reports": [r for s in stats for r in s["skipped"] + s["without_passages"]][:_MAX_REPORTED],
  }
  paths.write_text(manifest_path, json.dumps(manifest, indent=1))  # Last: the table's marker.
  return manifest


def _build_one(kwargs: dict) -> dict:
  return build_shard(**kwargs)


def build(
    knowledge_source: str,
    out_dir: str,
    num_shards: int = 1,
    words: int = DEFAULT_WORDS,
    passage_format: str = DEFAULT_FORMAT,
    skip_bad_lines: bool = False,
    processes: int = 1,
    progress: bool = True,
) -> dict:
  """Build every shard (`processes` at a time; finished ones are kept) and finalize."""
  jobs = [
      dict(
          knowledge_source=knowledge_source,
          out_dir=out_dir,
          shard_index=i,
          num_shards=num_shards,
          words=words,
          passage_format=passage_format,
          skip_bad_lines=skip_bad_lines,
          progress=progress,
      )
      for i in range(num_shards)
  ]
  if processes > 1:
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
      list(pool.map(_build_one, jobs))
  else:
    for job in jobs:
      _build_one(job)
  return finalize(out_dir, num_shards)


# ----------------------------------------------------------------------------
# CLI.


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.passages", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--knowledge_source", help="kilt_knowledgesource.json (one page per line)")
  parser.add_argument("--out", required=True, help="passage table directory")
  parser.add_argument("--words", type=int, default=DEFAULT_WORDS, help="words per passage")
  parser.add_argument(
      "--passage_format", default=DEFAULT_FORMAT, help="text of a passage, from {title} and {text}"
  )
  parser.add_argument(
      "--num_shards", type=int, default=1, help="shards of pages (contiguous byte ranges)"
  )
  parser.add_argument(
      "--shard_index", type=int, help="build only this shard (one process per shard)"
  )
  parser.add_argument("--processes", type=int, default=1, help="build this many shards at once")
  parser.add_argument("--finalize", action="store_true", help="only write the index and manifest")
  parser.add_argument(
      "--skip_bad_lines", action="store_true", help="count and report bad pages instead of failing"
  )
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if not args.finalize and not args.knowledge_source:
    parser.error("--knowledge_source is required unless --finalize")
  common = dict(
      words=args.words,
      passage_format=args.passage_format,
      skip_bad_lines=args.skip_bad_lines,
      progress=not args.no_progress,
  )
  try:
    if args.finalize:
      manifest = finalize(args.out, args.num_shards)
    elif args.shard_index is not None:
      stats = build_shard(
          args.knowledge_source, args.out, args.shard_index, args.num_shards, **common
      )
      print(
          f"shard {args.shard_index}: {stats['num_passages']} passages from {stats['num_pages']} pages; "
          f"run --finalize --num_shards {args.num_shards} once every shard is built"
      )
      return
    else:
      manifest = build(
          args.knowledge_source, args.out, args.num_shards, processes=args.processes, **common
      )
  except (OSError, ValueError, kilt.KiltFormatError) as err:
    parser.exit(1, f"error: {err}\n")
  print(
      f"{args.out}: {manifest['num_passages']} passages from {manifest['num_pages']} pages, "
      f"fingerprint {manifest['fingerprint'][:16]}; skipped lines: {manifest['skipped_lines']}, "
      f"pages without passages: {manifest['pages_without_passages']}"
  )
  for report in manifest["reports"]:
    print(f"  {report}")


if __name__ == "__main__":
  main()
