"""The benchmark scripts run with benchmarks/ first on sys.path (`python benchmarks/x.py`): a
script named like a module the stack imports (`compression`, which jax tries since Python 3.14
made it a standard package) would be imported in its place and break every benchmark."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_benchmark_script_shadows_a_module_the_stack_imports():
  code = (
      "import sys; sys.path.insert(0, 'benchmarks'); "
      "import jax, flax.linen, optax, orbax.checkpoint, tensorstore, seqio, matplotlib.pyplot"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
