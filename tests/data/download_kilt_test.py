"""The KILT downloader against a loopback HTTP server: resume after a cut, size checks, CLI."""

import http.server
import os
import re
import threading
import uuid

import pytest

from lumenvq import paths
from lumenvq.data import download_kilt

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


class Server(http.server.ThreadingHTTPServer):
  """Serves `files` with Range support; `cut_after[name] = n` cuts the next GET after n bytes."""

  def __init__(self):
    super().__init__(("127.0.0.1", 0), Handler)
    self.files, self.cut_after, self.head_size = {}, {}, {}
    self.ignore_range = False
    self.requests = []  # (method, name, Range header)

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/kilt/"


class Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def _name(self):
    return self.path.removeprefix("/kilt/")

  def do_HEAD(self):
    name = self._name()
    self.server.requests.append(("HEAD", name, None))
    if name not in self.server.files:
      return self.send_error(404)
    self.send_response(200)
    self.send_header(
        "Content-Length", str(self.server.head_size.get(name, len(self.server.files[name])))
    )
    self.end_headers()

  def do_GET(self):
    name, wanted = self._name(), self.headers.get("Range")
    self.server.requests.append(("GET", name, wanted))
    if name not in self.server.files:
      return self.send_error(404)
    data = self.server.files[name]
    start = (
        int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
        if wanted and not self.server.ignore_range
        else 0
    )
    body = data[start:]
    self.send_response(206 if start else 200)
    if start:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    cut = self.server.cut_after.pop(name, None)
    self.wfile.write(body[:cut] if cut is not None else body)
    if cut is not None:
      self.wfile.flush()
      self.close_connection = True


@pytest.fixture
def server():
  srv = Server()
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


def fetch(server, dest, **kwargs):
  return download_kilt.download_file(
      server.url + "nq-dev-kilt.jsonl",
      str(dest),
      progress=False,
      timeout=10,
      backoff_s=0,
      **kwargs,
  )


@pytest.mark.parametrize("where", ["local", "gs"])
def test_interrupted_download_resumes_with_range(server, tmp_path, where, request):
  """On gs:// (the local Cloud Storage server) the .part lives on local disk, since objects
  cannot be appended to, and the object appears only once whole."""
  server.files["nq-dev-kilt.jsonl"] = PAYLOAD
  server.cut_after["nq-dev-kilt.jsonl"] = 3000
  if where == "gs":
    dest = f"{request.getfixturevalue('gcs_bucket')}/kilt-{uuid.uuid4().hex[:8]}/nq-dev-kilt.jsonl"
    part = download_kilt._part_path(dest)  # pylint: disable=protected-access
    assert not paths.is_remote(part)
  else:
    dest = str(tmp_path / "nq-dev-kilt.jsonl")
    part = dest + ".part"
  with pytest.raises(
      download_kilt.DownloadError, match="nq-dev-kilt.jsonl: download from .* failed 1 time"
  ):
    fetch(server, dest, retries=0)
  assert not paths.path(dest).exists() and 0 < os.path.getsize(part) <= 3000
  done = os.path.getsize(part)
  fetch(server, dest, retries=0)  # a later run picks up the .part file
  assert paths.path(dest).read_bytes() == PAYLOAD and not os.path.exists(part)
  assert ("GET", "nq-dev-kilt.jsonl", f"bytes={done}-") in server.requests


def test_retries_resume_within_one_call(server, tmp_path):
  server.files["nq-dev-kilt.jsonl"] = PAYLOAD
  server.cut_after["nq-dev-kilt.jsonl"] = 5000
  fetch(server, tmp_path / "nq-dev-kilt.jsonl", retries=2)
  assert (tmp_path / "nq-dev-kilt.jsonl").read_bytes() == PAYLOAD
  assert [r[2] for r in server.requests if r[0] == "GET"][1].startswith("bytes=")


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
  server.files["nq-dev-kilt.jsonl"] = PAYLOAD
  server.ignore_range = True
  (tmp_path / "nq-dev-kilt.jsonl.part").write_bytes(PAYLOAD[:100])
  fetch(server, tmp_path / "nq-dev-kilt.jsonl")
  assert (tmp_path / "nq-dev-kilt.jsonl").read_bytes() == PAYLOAD


def test_size_mismatch_is_an_error_naming_the_file(server, tmp_path):
  server.files["nq-dev-kilt.jsonl"] = PAYLOAD
  server.head_size["nq-dev-kilt.jsonl"] = len(PAYLOAD) + 7  # HEAD says more than GET delivers
  dest = tmp_path / "nq-dev-kilt.jsonl"
  with pytest.raises(download_kilt.DownloadError, match="nq-dev-kilt.jsonl.*10247"):
    fetch(server, dest)
  assert not dest.exists()


def test_complete_files_are_skipped_and_wrong_ones_refused(server, tmp_path):
  server.files["nq-dev-kilt.jsonl"] = PAYLOAD
  dest = tmp_path / "nq-dev-kilt.jsonl"
  dest.write_bytes(PAYLOAD)
  fetch(server, dest)
  assert not [r for r in server.requests if r[0] == "GET"]
  dest.write_bytes(PAYLOAD[:10])
  with pytest.raises(download_kilt.DownloadError, match=f"{dest}: has 10 bytes but .* has 10240"):
    fetch(server, dest)


def test_missing_file_is_an_error(server, tmp_path):
  with pytest.raises(download_kilt.DownloadError, match="nq-dev-kilt.jsonl: HTTP 404"):
    fetch(server, tmp_path / "nq-dev-kilt.jsonl")


def test_cli_downloads_the_registry_files(server, tmp_path, capsys):
  for name in (
      "wned-dev-kilt.jsonl",
      "wned-test_without_answers-kilt.jsonl",
      "triviaqa-dev_id-kilt.jsonl",
      "kilt_knowledgesource.json",
  ):
    server.files[name] = name.encode() * 10
  out = tmp_path / "kilt"
  argv = ["--out", str(out), "--base_url", server.url, "--no_progress"]
  assert (
      download_kilt.main(
          ["--tasks", "wned,triviaqa", "--splits", "dev,test", "--knowledge_source", *argv]
      )
      == 1
  )
  assert "triviaqa-test_id_without_answers-kilt.jsonl: HTTP 404" in capsys.readouterr().err
  assert (
      download_kilt.main(
          ["--tasks", "wned,triviaqa", "--splits", "dev", "--knowledge_source", *argv]
      )
      == 0
  )
  assert sorted(os.listdir(out)) == [
      "kilt_knowledgesource.json",
      "triviaqa-dev_id-kilt.jsonl",
      "wned-dev-kilt.jsonl",
      "wned-test_without_answers-kilt.jsonl",
  ]
  assert (out / "wned-dev-kilt.jsonl").read_bytes() == b"wned-dev-kilt.jsonl" * 10
  assert download_kilt.main(["--tasks", "zsre", *argv]) == 1
  assert "unknown KILT task 'zsre'; known tasks: fever" in capsys.readouterr().err
  assert download_kilt.main(["--tasks", "nq", "--splits", "val", *argv]) == 1
  assert "unknown split(s) ['val']" in capsys.readouterr().err
