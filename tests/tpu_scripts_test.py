"""tpu/: the scripts' syntax and help, the gcloud commands their dry runs print (flags checked
against the installed gcloud's own help), the remote command reaching a worker's shell intact, and
the gin files under gin_configs/tpu parsing with the run files."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import gin
import pytest

from lumenvq import eval as eval_cli  # noqa: F401  Registers evaluate (runs/eval.gin).
from lumenvq import infer, train  # noqa: F401  infer, train: their gin names.
from lumenvq.training import gin_cli, partitioning

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
COMMANDS = ["create.sh", "install.sh", "run.sh", "delete.sh"]
TPU_GIN_FILES = sorted((ROOT / "gin_configs" / "tpu").glob("*.gin"))
V4_32_DEVICES = 16  # v4-32: 16 chips, one JAX device each.


def script(name, *args, env=None):
  full_env = {
      "PATH": os.environ["PATH"],
      "HOME": os.environ.get("HOME", "/tmp"),
      "PROJECT": "test-project",
  }
  full_env.update(env or {})
  return subprocess.run(
      ["bash", str(TPU / name), *args], env=full_env, capture_output=True, text=True, timeout=60
  )


def dry_run(name, *args, env=None):
  """The commands the script prints under --dry_run, each split as the shell would."""
  result = script(name, "--dry_run", *args, env=env)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_script(command):
  """The bash script inside `gcloud ... tpu-vm ssh ... --command='bash -c SCRIPT'`."""
  [value] = [w[len("--command=") :] for w in command if w.startswith("--command=")]
  words = shlex.split(value)
  assert words[:2] == ["bash", "-c"] and len(words) == 3, value
  return words[2]


def gcloud_commands():
  """Every gcloud command line the scripts can print, over their modes."""
  runs = [
      ("create.sh", ()),
      ("create.sh", ("--wait", "--spot")),
      ("create.sh", ("--direct",)),
      ("install.sh", ("--gcsfuse_bucket=b",)),
      ("install.sh", ("--repo_url=https://x/y.git",)),
      ("run.sh", ("--worker=0", "--", "ls")),
      ("delete.sh", ("--yes",)),
      ("delete.sh", ("--direct",)),
  ]
  return [c for name, args in runs for c in dry_run(name, *args) if c[0] == "gcloud"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(path):
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_the_settings(name):
  result = script(name, "--help", env={"PROJECT": ""})
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Usage: tpu/{name}")
  for setting in (
      "PROJECT",
      "ZONE",
      "TPU_NAME",
      "ACCELERATOR_TYPE",
      "RUNTIME_VERSION",
      "--dry_run",
  ):
    assert setting in result.stdout


def test_create_queues_a_resource():
  assert dry_run("create.sh") == [
      [
          "gcloud",
          "compute",
          "tpus",
          "queued-resources",
          "create",
          "lumenvq-qr",
          "--node-id=lumenvq",
          "--zone=us-central2-b",
          "--project=test-project",
          "--accelerator-type=v4-32",
          "--runtime-version=tpu-ubuntu2204-base",
      ]
  ]


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_runtime_version_follows_the_accelerator(accelerator, runtime):
  [command] = dry_run("create.sh", env={"ACCELERATOR_TYPE": accelerator, "TPU_NAME": "t1"})
  assert f"--accelerator-type={accelerator}" in command
  assert f"--runtime-version={runtime}" in command
  assert "--node-id=t1" in command and "t1-qr" in command


def test_flags_override_the_environment():
  [command] = dry_run(
      "create.sh",
      "--zone=europe-west4-a",
      "--runtime_version=v2-alpha-tpuv5",
      "--accelerator_type=v5p-8",
      "--queued_resource=q",
      "--tpu_name=n",
      env={"ZONE": "us-east1-d", "ACCELERATOR_TYPE": "v4-8"},
  )
  assert command[5:] == [
      "q",
      "--node-id=n",
      "--zone=europe-west4-a",
      "--project=test-project",
      "--accelerator-type=v5p-8",
      "--runtime-version=v2-alpha-tpuv5",
  ]


def test_create_direct_spot_passes_extra_gcloud_flags():
  [command] = dry_run("create.sh", "--direct", "--spot", "--", "--scopes=cloud-platform")
  assert command == [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "lumenvq",
      "--zone=us-central2-b",
      "--project=test-project",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
      "--spot",
      "--scopes=cloud-platform",
  ]


def test_create_wait_polls_the_state():
  create, describe = dry_run("create.sh", "--wait")
  assert describe == [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "describe",
      "lumenvq-qr",
      "--zone=us-central2-b",
      "--project=test-project",
      "--format=value(state.state)",
  ]


def test_bad_settings_are_named():
  result = script("create.sh", "--dry_run", env={"ACCELERATOR_TYPE": "v9-8"})
  assert result.returncode == 1 and not result.stdout
  assert "ACCELERATOR_TYPE=v9-8" in result.stderr and "RUNTIME_VERSION" in result.stderr
  result = script("delete.sh", "--dry_run", "--zonee=x")
  assert result.returncode == 1 and "unknown flag '--zonee=x'" in result.stderr


def test_missing_project_is_named(tmp_path):
  # An empty gcloud configuration: no core/project to fall back on.
  result = script("delete.sh", "--dry_run", env={"PROJECT": "", "CLOUDSDK_CONFIG": str(tmp_path)})
  assert result.returncode == 1 and not result.stdout
  assert "PROJECT is not set" in result.stderr


def test_install_copies_the_checkout_and_installs_on_every_worker():
  commands = dry_run("install.sh", "--gcsfuse_bucket=gs://my-bucket")
  pack, copy, unpack, environment, mount = commands
  assert pack[:2] == ["git", "-C"] and "tar" in pack
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in copy and copy[6] == "lumenvq:lumenvq-code.tar.gz"
  for command in (unpack, environment, mount):
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumenvq"]
    assert "--worker=all" in command
    result = subprocess.run(
        ["bash", "-n", "-c", remote_script(command)], capture_output=True, text=True
    )
    assert result.returncode == 0, (remote_script(command), result.stderr)
  assert "tar -xzf lumenvq-code.tar.gz -C lumenvq" in remote_script(unpack)
  env_script = remote_script(environment)
  assert "uv venv --python 3.11 .venv" in env_script
  assert 'uv pip install --python .venv/bin/python --quiet -e ".[tpu]"' in env_script
  assert "jax.distributed.initialize()" in env_script
  assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs/my-bucket" in remote_script(mount)


def test_install_from_git():
  [clone, environment] = dry_run(
      "install.sh", "--repo_url=https://example.com/lumenvq.git", "--ref=v1", "--remote_dir=lv"
  )
  script_text = remote_script(clone)
  assert "git clone https://example.com/lumenvq.git lv" in script_text
  assert "git -C lv fetch origin v1" in script_text
  assert "cd ~/lv" in remote_script(environment)


@pytest.fixture
def worker_home(tmp_path):
  """A worker's home directory with ~/lumenvq/.venv/bin/python that prints how it was called."""
  venv_bin = tmp_path / "lumenvq" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  python = venv_bin / "python"
  python.write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
      "                  'kilt': os.environ.get('KILT_DATA_DIR')}))\n"
  )
  python.chmod(0o755)
  return tmp_path


def on_worker(command, home):
  """Runs the --command of a printed `tpu-vm ssh` as the worker's login shell would."""
  [value] = [w[len("--command=") :] for w in command if w.startswith("--command=")]
  return subprocess.run(
      ["bash", "-c", value],
      env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
      capture_output=True,
      text=True,
      timeout=60,
  )


def test_run_delivers_arguments_unchanged(worker_home):
  args = [
      "-m",
      "lumenvq.train",
      "--gin_file=gin_configs/runs/finetune.gin",
      "--gin.MODEL_DIR='/mnt/gcs/b/run 1'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64}",
      "it's $HOME `date`",
  ]
  [command] = dry_run("run.sh", "--env=KILT_DATA_DIR=/home/me/kilt data", "--", "python", *args)
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumenvq"]
  assert "--worker=all" in command
  result = on_worker(command, worker_home)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == {
      "argv": args,
      "cwd": str(worker_home / "lumenvq"),
      "kilt": "/home/me/kilt data",
  }


def test_run_log_runs_in_the_background(worker_home):
  [command] = dry_run("run.sh", "--worker=2", "--log=step1", "--", "python", "-m", "x")
  assert "--worker=2" in command
  result = on_worker(command, worker_home)
  assert result.returncode == 0, result.stderr
  assert "logs/step1.log" in result.stdout
  log = worker_home / "lumenvq" / "logs" / "step1.log"
  for _ in range(100):  # The background process may not have written yet.
    if log.exists() and log.read_text():
      break
    subprocess.run(["sleep", "0.1"], check=True)
  assert '"argv": ["-m", "x"]' in log.read_text()


@pytest.mark.parametrize(
    "arg",
    [
        "--gin.MODEL_DIR='gs://bucket/run1'",
        "--gin_bindings=kilt_data.data_dir = 'gs://bucket/kilt'",
        '--gin.INITIAL_CHECKPOINT_PATH="gs://b/params"',
        "--gin.STORE_PATH='gs://bucket/store'",
        "--gin.VOCABULARY_PATH='gs://bucket/spiece.model'",
    ],
)
def test_run_passes_gs_paths_unchanged(arg):
  """Every lumenvq path setting takes gs:// (lumenvq/paths.py), so run.sh passes them on."""
  [command] = dry_run("run.sh", "--", "python", "-m", "lumenvq.train", arg)
  [url] = re.findall(r"gs://[^'\"]+", arg)
  assert url in remote_script(command)


def test_run_needs_a_command():
  result = script("run.sh", "--dry_run")
  assert result.returncode == 1 and "no command to run" in result.stderr


def test_delete():
  assert dry_run("delete.sh", "--yes") == [
      [
          "gcloud",
          "compute",
          "tpus",
          "queued-resources",
          "delete",
          "lumenvq-qr",
          "--zone=us-central2-b",
          "--project=test-project",
          "--force",
          "--quiet",
      ]
  ]
  assert dry_run("delete.sh", "--direct") == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "delete",
          "lumenvq",
          "--zone=us-central2-b",
          "--project=test-project",
      ]
  ]


def _help(words):
  result = subprocess.run(
      ["gcloud", *words, "--help"],
      capture_output=True,
      text=True,
      timeout=60,
      env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
  )
  assert result.returncode == 0, result.stderr
  return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the gcloud CLI")
def test_gcloud_flags_exist():
  """Every flag the scripts pass is in the help of its gcloud command (or gcloud's wide flags)."""
  wide = _help([])
  helps = {}
  for command in gcloud_commands():
    group = tuple(command[1:5])  # compute tpus <queued-resources|tpu-vm> <verb>
    helps.setdefault(group, _help(list(group)))
    for word in command[5:]:
      if word.startswith("--"):
        flag = word.split("=", 1)[0]
        pattern = rf"(?<![\w-]){re.escape(flag)}(?![\w-])"
        assert re.search(pattern, helps[group]) or re.search(pattern, wide), (flag, group)


def test_readme_xla_flags_are_known_to_xla():
  """XLA stops on an unknown XLA_FLAGS entry; the README's flags must all load."""
  flags = sorted(set(re.findall(r"--xla_[a-z0-9_]+=\w+", (TPU / "README.md").read_text())))
  assert flags
  result = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"],
      env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]


BINDINGS = [
    "MODEL_DIR = '/tmp/model'",
    "INITIAL_CHECKPOINT_PATH = '/tmp/ckpt/params'",
    "TRAIN_STEPS = 10",
    "KILT_DIR = '/tmp/kilt'",
    "VOCABULARY_PATH = '/tmp/spiece.model'",
]


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("run_file", ["finetune", "eval", "infer"])
@pytest.mark.parametrize("path", TPU_GIN_FILES, ids=lambda p: p.name)
def test_tpu_gin_files_parse_after_run_files(clean_gin, path, run_file):
  gin_cli.parse_gin([f"gin_configs/runs/{run_file}.gin", str(path)], BINDINGS)
  import tasks  # pylint: disable=g-import-not-at-top  The gin file imported it already.

  data = tasks.kilt.kilt_data()
  assert (data.data_dir, data.vocabulary_path) == ("/tmp/kilt", "/tmp/spiece.model")
  assert data.passages_dir == "/tmp/kilt/passages"
  assert gin.query_parameter("BATCH_SIZE/gin.macro.value") % V4_32_DEVICES == 0
  mesh = partitioning.make_mesh()  # MESH_SHAPE must fit any device count: 8 CPU devices here.
  assert mesh.devices.size == 8


def test_base_lumen_vq_is_the_published_recipe_at_base_size(clean_gin):
  gin_cli.parse_gin(
      ["gin_configs/runs/finetune.gin", "gin_configs/tpu/base_lumen_vq.gin"], BINDINGS
  )
  from lumenvq.model.network_config import T5Config  # pylint: disable=g-import-not-at-top
  from lumenvq.model.reader_config import ReaderConfig  # pylint: disable=g-import-not-at-top

  reader, t5 = ReaderConfig(), T5Config()
  assert (reader.architecture, reader.subspace_dim, reader.codebook_size) == ("lumen_vq", 16, 65536)
  assert (t5.emb_dim, t5.num_encoder_layers) == (768, 12)
  assert gin.query_parameter("MIXTURE_OR_TASK_NAME/gin.macro.value") == "kilt_nq"


def test_required_paths_are_named_when_missing(clean_gin):
  with pytest.raises(gin_cli.GinConfigError, match="KILT_DIR"):
    gin_cli.parse_gin(
        ["gin_configs/runs/eval.gin", "gin_configs/tpu/base_lumen_vq.gin"],
        [b for b in BINDINGS if not b.startswith("KILT_DIR")],
    )
