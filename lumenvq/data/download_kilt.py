"""Download the official KILT files, resumably.

    python -m lumenvq.data.download_kilt --tasks nq,hotpotqa --out data/kilt \
        [--splits dev] [--knowledge_source] [--base_url URL]

Each file goes to `NAME.part`, continued with an HTTP Range request after an
interruption (also across runs), checked against the server's size and only
then renamed to `NAME`, so a file under its final name is always complete.
Files already complete are skipped. TriviaQA comes as ids only: afterwards
run `python -m lumenvq.data.kilt restore_triviaqa` with your TriviaQA files.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import hashlib
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Sequence

import tqdm

from lumenvq import paths
from lumenvq.data import kilt

logger = logging.getLogger(__name__)

# From the official KILT README (facebookresearch/KILT).
BASE_URL = "http://dl.fbaipublicfiles.com/KILT/"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
  """A failed download, or one whose size is not the server's; the message names the file."""


def _remote_size(url: str, timeout: float) -> int | None:
  """Content-Length from a HEAD request, or None when the server does not say."""
  try:
    with urllib.request.urlopen(
        urllib.request.Request(url, method="HEAD"), timeout=timeout
    ) as resp:
      length = resp.headers.get("Content-Length")
  except urllib.error.HTTPError as err:
    if err.code in (405, 501):  # HEAD not allowed: learn the size from the GET
      return None
    raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
  except (OSError, http.client.HTTPException) as err:
    raise DownloadError(f"{url}: cannot reach the server ({err!r})") from None
  return int(length) if length and length.isdigit() else None


def _fetch(
    url: str, part: str, offset: int, expected: int | None, progress: bool, timeout: float
) -> int | None:
  """Append the rest of `url` from byte `offset` to `part`; returns the total size if learned."""
  headers = {"Range": f"bytes={offset}-"} if offset else {}
  try:
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
  except urllib.error.HTTPError as err:
    if err.code == 416 and expected is None:  # nothing left past `offset`
      return offset
    raise
  with resp:
    if offset and resp.status == 206:
      match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
      if not match or int(match.group(1)) != offset:
        raise DownloadError(
            f"{url}: asked for bytes from {offset}, got Content-Range "
            f"{resp.headers.get('Content-Range')!r}"
        )
      total = int(match.group(2)) if match.group(2) != "*" else expected
    else:  # 200: a fresh download, or a server that ignores Range: start over
      offset = 0
      length = resp.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else expected
    if expected is not None and total is not None and total != expected:
      raise DownloadError(
          f"{os.path.basename(part)}: the server now says {total} bytes, before {expected}"
      )
    with open(part, "ab" if offset else "wb") as f, tqdm.tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        desc=os.path.basename(part).removesuffix(".part"),
        disable=not progress,
    ) as bar:
      while chunk := resp.read(_CHUNK):
        f.write(chunk)
        bar.update(len(chunk))
  size = os.path.getsize(part)
  if total is not None and size < total:
    # http.client returns b"" rather than raising when a sized body is cut short.
    raise ConnectionError(f"connection closed after {size} of {total} bytes")
  return total


def download_file(
    url: str,
    dest: str,
    retries: int = 5,
    progress: bool = True,
    timeout: float = 60.0,
    backoff_s: float = 2.0,
) -> str:
  """Download `url` to `dest`, local or gs:// (resuming its `.part`); returns `dest`.

  Interruptions are retried `retries` times, each resuming where the last
  stopped; a run that still fails leaves the `.part` for the next run.
  """
  name = os.path.basename(dest)
  expected = _remote_size(url, timeout)
  if paths.path(dest).exists():
    size = paths.path(dest).stat().length
    if expected is None or size == expected:
      logger.info("%s: already complete (%d bytes), skipped", dest, size)
      return dest
    raise DownloadError(
        f"{dest}: has {size} bytes but {url} has {expected}; delete it to download again"
    )
  part = _part_path(dest)
  failures = 0
  while True:
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if expected is not None and offset > expected:
      raise DownloadError(
          f"{part}: has {offset} bytes, more than the {expected} of {url}; delete it"
      )
    if expected is not None and offset == expected:
      break
    try:
      expected = _fetch(url, part, offset, expected, progress, timeout)
      break
    except urllib.error.HTTPError as err:
      raise DownloadError(f"{name}: {url}: HTTP {err.code} {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:  # dropped connection, timeout, reset
      failures += 1
      if failures > retries:
        raise DownloadError(
            f"{name}: download from {url} failed {failures} time(s) ({err!r}); "
            f"run again to resume from {part}"
        ) from err
      logger.warning("%s: interrupted (%r), resuming (%d/%d)", name, err, failures, retries)
      time.sleep(backoff_s * failures)
  size = os.path.getsize(part) if os.path.exists(part) else 0
  if expected is not None and size != expected:
    raise DownloadError(
        f"{name}: got {size} bytes but the server's Content-Length is {expected}; "
        f"{part} kept, delete it to start over"
    )
  if paths.is_remote(dest):
    paths.upload(part, dest)  # One object, visible once whole.
    os.remove(part)
  else:
    os.replace(part, dest)
  return dest


def _part_path(dest: str) -> str:
  """Where `dest` downloads to first: beside it, or, for gs:// (an object cannot be appended
  to), in the local temp dir under a name of the destination, so that a rerun resumes it."""
  if not paths.is_remote(dest):
    return dest + ".part"
  directory = os.path.join(tempfile.gettempdir(), "lumenvq-download")
  os.makedirs(directory, exist_ok=True)
  key = hashlib.sha256(dest.encode()).hexdigest()[:16]
  return os.path.join(directory, f"{key}-{os.path.basename(dest)}.part")


def files_for(tasks: Sequence[str], splits: Sequence[str]) -> list[str]:
  """Server file names of `splits` of `tasks` (splits a task lacks are left out)."""
  names = []
  for task in (kilt.get_task(name) for name in tasks):
    names += [task.download_file(split) for split in splits if split in task.files]
  return names


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.download_kilt", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
      "--tasks", default="", help=f"comma-separated, or 'all': {','.join(kilt.TASKS)}"
  )
  parser.add_argument(
      "--splits", default=",".join(kilt.SPLITS), help="comma-separated subset of train,dev,test"
  )
  parser.add_argument(
      "--knowledge_source",
      action="store_true",
      help=f"also {kilt.KNOWLEDGE_SOURCE_FILE} (35 GiB)",
  )
  parser.add_argument("--out", required=True, help="directory to download into")
  parser.add_argument("--base_url", default=BASE_URL, help="where the KILT files are served")
  parser.add_argument("--retries", type=int, default=5, help="resumes per file before giving up")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  tasks = list(kilt.TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
  splits = [s for s in args.splits.split(",") if s]
  try:
    bad = [s for s in splits if s not in kilt.SPLITS]
    if bad:
      raise ValueError(f"unknown split(s) {bad}; splits are {list(kilt.SPLITS)}")
    names = files_for(tasks, splits) + (
        [kilt.KNOWLEDGE_SOURCE_FILE] if args.knowledge_source else []
    )
    if not names:
      raise ValueError("nothing to download: give --tasks and/or --knowledge_source")
    paths.makedirs(args.out)
    base = args.base_url if args.base_url.endswith("/") else args.base_url + "/"
    for name in names:
      download_file(base + name, paths.join(args.out, name), args.retries, not args.no_progress)
      print(paths.join(args.out, name))
  except (ValueError, DownloadError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  if "triviaqa" in tasks:
    logger.info("TriviaQA has ids only: run `python -m lumenvq.data.kilt restore_triviaqa` next")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
