"""The path layer on a local directory and on the Cloud Storage emulator (gs://)."""

import os
import uuid

import pytest

from lumenvq import paths


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return f"{request.getfixturevalue('gcs_bucket')}/paths-{uuid.uuid4().hex[:8]}"


def test_resolve_makes_local_paths_absolute_and_keeps_urls():
  assert paths.resolve("x/y") == os.path.abspath("x/y")
  assert paths.resolve("gs://b/x/y") == "gs://b/x/y"
  assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")
  assert paths.join("gs://b/x", "c", "d.json") == "gs://b/x/c/d.json"


def test_atomic_write_reads_back_and_leaves_nothing_else(root):
  paths.makedirs(root)
  target = paths.join(root, "metrics.json")
  paths.write_text(target, '{"a": 1}')
  assert paths.path(target).read_text() == '{"a": 1}'
  paths.write_bytes(target, b"second")
  assert paths.path(target).read_bytes() == b"second"
  assert [p.name for p in paths.path(root).iterdir()] == ["metrics.json"]


def test_a_failed_write_publishes_nothing(root):
  directory = paths.makedirs(root)
  paths.write_text(directory / "other", "x")
  target = paths.join(root, "predictions.jsonl")
  with pytest.raises(RuntimeError, match="half-way"):
    with paths.atomic_open(target) as f:
      f.write("partial\n" * 1000)
      raise RuntimeError("half-way")
  assert not paths.path(target).exists()
  assert [p.name for p in directory.iterdir()] == ["other"]
