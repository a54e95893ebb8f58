"""Shared command-line plumbing for the CLIs, after T5X's gin_utils.

    python -m lumenvq.train --gin_file=gin_configs/debug/tiny_train.gin \\
        --gin.MODEL_DIR="'/tmp/x'" --gin.TRAIN_STEPS=20

`--gin_file` repeats; `--gin.NAME=VALUE` is rewritten to a gin binding
`NAME = VALUE` (so strings need their gin quotes); `--gin_search_paths` adds
include directories (the repository root and the working directory are always
searched). A binding gin does not know stops with gin's message and the
closest known names. Multi-process runs call `jax.distributed.initialize`
with flags, else gin (`initialize_distributed.*`), else the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU pods
JAX detects the cluster itself.
"""

import difflib
import inspect
import os
import re
import sys
from typing import Callable, Optional, Sequence

import gin
from absl import app, flags, logging

from lumenvq import paths

flags.DEFINE_multi_string("gin_file", [], "gin files, in order; later ones override.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings (`--gin.NAME=VALUE` adds these).")
flags.DEFINE_list("gin_search_paths", [], "Directories searched for gin files and includes.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process' index (multi-process).")
FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rewrite_gin_args(argv: Sequence[str]) -> list:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (T5X's convention)."""
  out = []
  for arg in argv:
    match = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.S)
    out.append(f"--gin_bindings={match.group(1)} = {match.group(2)}" if match else arg)
  return out


def _known_configurables() -> list:
  # gin has no public listing of registered names; read its registry, and
  # degrade to no suggestions if that internal ever moves.
  try:
    names = [name for name, _ in gin.config._REGISTRY.items()]  # pylint: disable=protected-access
  except (AttributeError, TypeError):
    return []
  return sorted({name.split(".")[-1] for name in names} | set(names))


def _parameters_of(configurable_name: str) -> list:
  try:  # The same gin internal as above.
    registry = gin.config._REGISTRY  # pylint: disable=protected-access
    configurable = registry.get_match(configurable_name)
    return list(inspect.signature(configurable.wrapped).parameters)
  except (AttributeError, KeyError, TypeError, ValueError):
    return []


def _macro_names(text: str) -> list:
  return re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, flags=re.M)


def closest_names_hint(message: str, config_text: str = "") -> str:
  """'Closest names to X: ...' for gin's unknown configurable, parameter and macro errors."""
  if m := re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message):
    candidates, wrong = _parameters_of(m.group(1)), m.group(2)
  elif m := re.search(r"No configurable matching '([^']+)'", message):
    candidates, wrong = _known_configurables(), m.group(1)
  elif m := re.search(r"No bindings specified for '([^'/]+)/gin.macro'", message):
    # gin appends the config it knows to this message; macros bound there are candidates.
    candidates, wrong = _macro_names(message + "\n" + config_text), m.group(1)
  else:
    return ""
  close = difflib.get_close_matches(wrong, candidates, n=3, cutoff=0.5)
  return f"\nClosest names to '{wrong}': {', '.join(close)}" if close else ""


class GinConfigError(ValueError):
  """A gin file or binding that gin rejects; the message adds the closest names."""


def parse_gin(
    gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()
) -> None:
  """Parses files then bindings (bindings win), like T5X; unknown names stop here."""
  for path in [REPO_ROOT, os.getcwd(), *search_paths]:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
  except (ValueError, IOError) as e:
    raise GinConfigError(f"{e}{closest_names_hint(str(e))}") from e


_GIN_CALL_ERRORS = re.compile(
    r"Required bindings for|No bindings specified for|" r"set to `%gin.REQUIRED`"
)


def call_with_gin_errors(fn: Callable, *args, **kwargs):
  """Calls a gin configurable; a missing or misspelt macro or binding becomes a
  GinConfigError with the closest names. Other errors pass through unchanged."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    if not _GIN_CALL_ERRORS.search(str(e)):
      raise
    raise GinConfigError(f"{e}{closest_names_hint(str(e), gin.config_str())}") from e


@gin.configurable
def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    auto_detect: bool = False,
) -> None:
  """`jax.distributed.initialize` from flags, then gin, then the environment.

  With `auto_detect`, or on a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES
  or TPU_PROCESS_ADDRESSES lists several hosts), JAX finds the cluster itself
  (Cloud TPU, SLURM, Open MPI). Otherwise a single process runs without it.
  """
  import jax  # pylint: disable=g-import-not-at-top

  address = (
      FLAGS.coordinator_address or coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  )
  count = FLAGS.num_processes or num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
  index = (
      FLAGS.process_id
      if FLAGS.process_id is not None
      else (process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID"))
  )
  tpu_hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if address and count:
    if index is None:
      raise GinConfigError("a multi-process run needs --process_id (or JAX_PROCESS_ID)")
    logging.info(
        "jax.distributed.initialize(%s, num_processes=%d, process_id=%s)", address, count, index
    )
    jax.distributed.initialize(address, num_processes=count, process_id=int(index))
  elif auto_detect or "," in tpu_hosts:
    logging.info("jax.distributed.initialize() with cluster auto-detection")
    jax.distributed.initialize()


def write_config(directory: str, name: str = "config.gin") -> str:
  """Writes the operative gin config (what the run used) atomically; process 0 only."""
  import jax  # pylint: disable=g-import-not-at-top

  path = paths.join(directory, name)
  if jax.process_index() == 0:
    paths.write_text(path, gin.operative_config_str())
  return path


class _QuietLibraryInfo:
  """Drops INFO lines from orbax (dozens per checkpoint); warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def run(main: Callable, expected_errors: tuple = ()) -> None:
  """absl `app.run` with gin flags; `main(argv)` runs after gin is parsed and
  the distributed system is up. Gin errors and `expected_errors` (bad
  settings, a non-finite loss) exit 1 with their message, without a traceback."""

  def wrapped(argv):
    logging.get_absl_handler().addFilter(_QuietLibraryInfo())
    try:
      parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
      initialize_distributed()
      return main(argv)
    except (GinConfigError,) + tuple(expected_errors) as e:
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(wrapped, flags_parser=lambda argv: FLAGS(rewrite_gin_args(argv)))


def run_configurable(fn: Callable, expected_errors: tuple = ()) -> None:
  """The whole main of a CLI whose work is one gin configurable (train, eval, infer)."""

  def main(argv):
    del argv
    call_with_gin_errors(fn)  # Its return value is not an exit status.

  run(main, expected_errors)
