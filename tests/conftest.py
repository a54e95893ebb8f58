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
    with gin.unlock_config():
      gin.clear_config()
      gin_cli.parse_gin(gin_files, bindings)
      try:
        return reader_models.ReaderModel()
      finally:
        gin.clear_config()

  return build
