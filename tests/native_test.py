"""native: a built library loads; one that was not built is None, with a warning saying
what its absence costs."""

import ctypes

import pytest

from lumenvq import native


def test_a_built_library_loads(cxx_compiler):
  if cxx_compiler is None:
    pytest.skip("no C++ compiler: nothing was built")
  assert isinstance(native.library("memory._gather_rows", "x"), ctypes.CDLL)


def test_a_missing_library_is_none_and_says_what_it_costs(caplog):
  with caplog.at_level("WARNING"):
    assert native.library("_no_such_library", "it costs a test") is None
  assert "lumenvq._no_such_library is not built" in caplog.text
  assert "it costs a test" in caplog.text
