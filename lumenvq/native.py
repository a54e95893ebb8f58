"""The optional C++ libraries setup.py builds (the csrc/ of quant and memory), loaded or None.

setup.py builds them as extension modules only to compile them with the package; they are
plain shared libraries, loaded with ctypes (CDLL, which releases the GIL during a call).
"""

import ctypes
import functools
import importlib.util
from typing import Optional

from absl import logging


@functools.cache
def library(name: str, without: str) -> Optional[ctypes.CDLL]:
  """lumenvq.<name> if it was built; else None, logging once what `without` it costs."""
  spec = importlib.util.find_spec(f"lumenvq.{name}")
  if spec is None or not spec.origin:
    logging.warning(
        "lumenvq.%s is not built (pip install -e . builds it when a C++ compiler "
        "is present): %s",
        name,
        without,
    )
    return None
  return ctypes.CDLL(spec.origin)
