"""`make demo`'s pipeline (`python -m lumenvq.demo`) at a reduced size: the same stages and
CLIs on a small world with a 32-dim reader and a few steps, so `make test` keeps it
working; then a rerun that reuses every finished stage, and one that redoes only the
stage whose output was removed. Both on a local directory and with every path on gs:// (the
local Cloud Storage server of `gcs_bucket`)."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from lumenvq import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--num_entities=120",
    "--train_size=120",
    "--dev_size=24",
    "--vocab_size=600",
    "--curriculum_steps=2",
    "--train_steps=4",
    "--vq_steps=2",
    *[
        f"--gin={b}"
        for b in (
            "T5Config.vocab_size=704",
            "T5Config.emb_dim=32",
            "T5Config.head_dim=8",
            "T5Config.mlp_dim=64",
            "ReaderConfig.num_subspaces=4",
            "ReaderConfig.codebook_size=16",
            "BATCH_SIZE=8",
        )
    ],
]


def _demo(out):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run(
      [sys.executable, "-m", "lumenvq.demo", f"--out={out}", *SMALL],
      cwd=REPO,
      env=env,
      text=True,
      capture_output=True,
      timeout=900,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module", params=["local", "gs"])
def first_run(request, tmp_path_factory):
  if request.param == "gs":
    out = f"{request.getfixturevalue('gcs_bucket')}/demo-{uuid.uuid4().hex[:8]}"
  else:
    out = str(tmp_path_factory.mktemp("demo"))
  return out, _demo(out)


def test_every_stage_runs_and_prints_the_tables(first_run):
  out, stdout = first_run
  for stage in (
      "BM25 retrieval",
      "train LUMEN, curriculum",
      "train LUMEN on K passages",
      "train LUMEN-VQ from the LUMEN checkpoint",
      "precompute the LUMEN-VQ memory store",
      "evaluate LUMEN-VQ reading the store",
  ):
    assert f"== {stage}" in stdout
  assert "KILT downstream metrics" in stdout and "Memory stores on disk" in stdout
  results = json.loads(paths.path(out, "results.json").read_text())
  assert [r["task"] for r in results["downstream"]] == [
      "nq",
      "hotpotqa",
      "fever",
      "structured_zeroshot",
  ]
  assert all(0 <= r["em"] <= 1 for r in results["downstream"])
  raw, lumen, vq = results["storage"]
  assert raw["bytes_per_token"] == 64 and raw["compression"] == 1  # d = 32 in bf16.
  assert lumen["kind"] == "vectors" and vq["kind"] == "codes"
  # 4 one-byte codes: 16x, less the metadata and codebooks, which a store of a few
  # hundred passages does not amortise; zstd gains a little on the bf16 vectors.
  assert 4 < vq["compression"] <= 16 and 0.5 < lumen["compression"] < 4
  predictions = paths.path(
      out, "models", "lumen_vq", "eval_from_store", "lumenvq_demo_nq-validation-2.jsonl"
  )
  assert len(predictions.read_text().splitlines()) == 24


def test_rerun_reuses_finished_stages_and_redoes_a_removed_one(first_run):
  out, _ = first_run
  stdout = _demo(out)
  assert stdout.count("finished earlier, reusing it") == 8  # All but the self-skipping CLIs.
  paths.path(out, "models", "lumen_vq", "eval_from_store", "metrics_2.json").unlink()
  stdout = _demo(out)
  assert stdout.count("finished earlier, reusing it") == 7
  assert "== evaluate LUMEN-VQ reading the store (device-resident table)\n" in stdout
