"""The demo world built by the command sequence documented in tasks/demo.py, once per session.

Each documented `python -m MODULE ARGS` runs in-process (`MODULE.main(ARGS)`),
with `demo_out` moved to a temporary directory and smaller sizes appended (a
later argparse flag wins), so the documented commands themselves are tested.
"""

import importlib
import re
import shlex

import pytest

import tasks.demo

SMALLER = {
    "lumenvq.data.demo": ["--num_entities", "300", "--train_size", "40", "--dev_size", "20"],
    "lumenvq.data.train_vocab": ["--vocab_size", "400"],
    "lumenvq.data.passages": ["--no_progress"],
    "lumenvq.data.retrieve": ["--no_progress"],
}


def documented_commands() -> list[list[str]]:
  """The `python -m ...` commands of tasks/demo.py's docstring, as argument lists."""
  text = tasks.demo.__doc__.replace("\\\n", " ")
  return [shlex.split(line) for line in re.findall(r"^\s*(python -m .*)$", text, flags=re.M)]


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
  """The root of a small demo world: demo_out/{data,passages,vocab,retrieval}."""
  root = tmp_path_factory.mktemp("cwd") / "demo_out"
  commands = documented_commands()
  assert [c[2] for c in commands] == [
      "lumenvq.data.demo",
      "lumenvq.data.passages",
      "lumenvq.data.train_vocab",
      "lumenvq.data.retrieve",
  ]
  for _, _, module, *args in commands:
    args = [re.sub(r"(^|[=,])demo_out/", rf"\g<1>{root}/", a) for a in args]
    importlib.import_module(module).main(args + SMALLER[module])
  return root
