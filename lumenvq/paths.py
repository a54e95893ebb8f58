"""The one path layer: every user path (local or `gs://bucket/...`) through etils epath.

A local path is made absolute (against the working directory at the time); a URL stays
as given. Remote paths go through epath's fsspec backend (gcsfs), which orbax's epath
shares: gcsfs needs no TensorFlow file-system plugin and honours `STORAGE_EMULATOR_HOST`,
where tf.io.gfile (epath's default while TensorFlow is installed) has a fixed endpoint.
Listings are not cached: another process (a resumed or a concurrent job) may have
written since, and a stale listing would hide its newest checkpoint or shard.

Object stores have no rename, so the atomic writes here differ by kind: a local file is
written under a temporary name and renamed; a remote object is written whole in one
upload, and appears under its final name only once that upload has finished. Either
way a reader sees the complete file or none.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterator, Union

os.environ.setdefault("EPATH_USE_TF", "false")  # Before epath picks a backend (lazily, once).

import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """True for a URL (`gs://...`): no local file APIs, no rename, no memory map."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """The path as a string: absolute when local, unchanged when remote."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def path(p: PathLike, *parts: str) -> epath.Path:
  """`resolve(p)`, joined with `parts`, as an epath.Path."""
  return epath.Path(resolve(p)).joinpath(*parts)


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local and remote bases alike."""
  return os.fspath(path(base, *parts))


def tree_bytes(directory: PathLike) -> int:
  """Bytes of every file under `directory` (an object prefix on gs://): one listing of the
  whole tree (fsspec's `du`; epath has no recursive size)."""
  fs, root = fsspec.core.url_to_fs(resolve(directory))
  return int(fs.du(root, total=True))


def makedirs(directory: PathLike) -> epath.Path:
  """Creates `directory` and its parents (a no-op on an object store); returns it."""
  p = path(directory)
  p.mkdir(parents=True, exist_ok=True)
  return p


@contextlib.contextmanager
def atomic_open(target: PathLike, mode: str = "w") -> Iterator:
  """A file to write `target` through (`mode` "w" or "wb"), published whole on a clean exit
  and never (nothing under `target`) on an exception or a kill.

  Local: a temporary file beside `target`, renamed. Remote: a local temporary file, then one
  upload, which the store makes visible under `target` only once it has finished."""
  final = path(target)
  directory = None if is_remote(final) else os.fspath(final.parent)
  fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    if directory is not None:
      os.replace(tmp, final)
    else:
      upload(tmp, final)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local: str, remote: PathLike) -> None:
  """Streams the local file `local` to `remote` as one object; an interrupted upload is
  abandoned, so it does not publish a truncated object."""
  out = path(remote).open("wb")
  try:
    with open(local, "rb") as f:
      shutil.copyfileobj(f, out, 1 << 20)
  except BaseException:
    out.discard()  # fsspec: drop the buffered or resumable upload, then
    out.closed = True  # keep close() (also run by the file's finalizer) from sending it.
    raise
  out.close()


def staging_dir(target: PathLike) -> str:
  """A fresh local directory to build `target` in before `publish_dir`: beside it when local
  (one file system, so the rename is atomic), else in the temp dir."""
  if is_remote(target):
    return tempfile.mkdtemp(prefix=f"lumenvq-{path(target).name}-")
  final = resolve(target)
  staging = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  return staging


def publish_dir(local_dir: str, target: PathLike, marker: str) -> None:
  """Moves the finished local directory `local_dir` (flat) to `target`, replacing what was
  there; its file `marker` says it is complete. Local: one rename (if another process
  published one in the meantime, that stays). Remote, where there is no rename: the old
  marker deleted, every file uploaded whole, the marker last."""
  if not is_remote(target):
    final = resolve(target)
    try:
      shutil.rmtree(final, ignore_errors=True)
      os.replace(local_dir, final)
    except OSError:
      if not os.path.exists(os.path.join(final, marker)):
        raise
    finally:
      shutil.rmtree(local_dir, ignore_errors=True)
    return
  try:
    path(target, marker).unlink(missing_ok=True)
    for name in sorted(os.listdir(local_dir), key=lambda n: n == marker):
      upload(os.path.join(local_dir, name), path(target, name))
  finally:
    shutil.rmtree(local_dir, ignore_errors=True)


def write_text(target: PathLike, text: str) -> str:
  """Writes `text` to `target` atomically (see `atomic_open`); returns the path."""
  with atomic_open(target, "w") as f:
    f.write(text)
  return resolve(target)


def write_bytes(target: PathLike, data: bytes) -> str:
  """Writes `data` to `target` atomically (see `atomic_open`); returns the path."""
  with atomic_open(target, "wb") as f:
    f.write(data)
  return resolve(target)


def local_copy_dir(p: PathLike, marker: str) -> str:
  """A local directory with the files of the (flat) directory `p`, for libraries that
  memory-map files by name (bm25s): `p` itself when local, else a copy cached by the
  content of its `marker`, which changes whenever the directory is published again."""
  if not is_remote(p):
    return resolve(p)
  key = hashlib.sha256((resolve(p) + path(p, marker).read_text()).encode()).hexdigest()[:32]
  cached = os.path.join(tempfile.gettempdir(), "lumenvq-remote", f"{key}-{path(p).name}")
  if not os.path.exists(os.path.join(cached, marker)):
    staging = tempfile.mkdtemp(prefix=".staging-", dir=makedirs(os.path.dirname(cached)))
    for item in path(p).iterdir():
      with open(os.path.join(staging, item.name), "wb") as f:
        f.write(item.read_bytes())
    publish_dir(staging, cached, marker)
  return cached


def local_copy(p: PathLike) -> str:
  """A local file with the bytes of `p`, for libraries that open files by name only
  (SentencePiece): `p` itself when local, else a copy cached by content in the temp dir."""
  if not is_remote(p):
    return resolve(p)
  data = path(p).read_bytes()
  digest = hashlib.sha256(data).hexdigest()[:32]
  cached = os.path.join(tempfile.gettempdir(), "lumenvq-remote", f"{digest}-{path(p).name}")
  if not os.path.exists(cached):
    makedirs(os.path.dirname(cached))
    write_bytes(cached, data)
  return cached
