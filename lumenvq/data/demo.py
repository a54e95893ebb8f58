"""The demo data: a fictional world written in KILT's own file formats.

    python -m lumenvq.data.demo --out demo_out/kilt [--seed 0] [--num_entities 2500] \\
        [--train_size 5000] [--dev_size 500] [--force]

Writes `kilt_knowledgesource.json` (one page per line, see `demo_world`) and,
for nq (single-hop questions), hotpotqa (two-hop questions), fever (claims,
SUPPORTS / REFUTES, half each) and structured_zeroshot (`subject [SEP]
relation`), `<task>-train-kilt.jsonl` and `<task>-dev-kilt.jsonl` with gold
provenance: every paragraph that states the fact, one output per way of
proving the answer. Since the world is invented, the same loaders, retrievers
and metrics that read real KILT can be tested end to end without a download.

Dev examples ask only about (subject, relation) pairs that no train example of
any task asks about (a two-hop question counts as asking about its first hop),
so memorising train answers cannot help on dev. `meta` names the pair.

Each file is written under a temporary name and renamed, and
`demo_manifest.json` (settings, line counts and sha256 of every file) last; a
rerun with the same settings skips the work while every file still matches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import random
import time
from typing import Iterable, Iterator, Sequence

from lumenvq import paths
from lumenvq.data import kilt
from lumenvq.data.demo_world import Mention, RELATIONS, World, build_world

logger = logging.getLogger(__name__)

TASK_NAMES = ("nq", "hotpotqa", "fever", "structured_zeroshot")
SPLITS = ("train", "dev")
MANIFEST_FILE = "demo_manifest.json"
DEFAULT_NUM_ENTITIES = 2500
DEFAULT_TRAIN_SIZE = 5000
DEFAULT_DEV_SIZE = 500
DEV_PAIR_FRACTION = 0.15
# Bump when the files written for a given seed change, so that older manifests stop matching.
FORMAT_VERSION = 1
ZSRE_SEPARATOR = " [SEP] "  # as in KILT's structured_zeroshot inputs
SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"


@dataclasses.dataclass(frozen=True)
class _Chain:
  """A two-hop question: subject -first-> bridge entity -second-> answer."""

  first: str
  second: str
  questions: tuple[str, ...]


_CHAINS = (
    _Chain(
        "born_in",
        "located_in",
        ("in which country was {s} born?", "{s} was born in which country?"),
    ),
    _Chain(
        "spouse",
        "born_in",
        ("where was the spouse of {s} born?", "in which city was the spouse of {s} born?"),
    ),
    _Chain(
        "spouse",
        "birth_year",
        ("when was the spouse of {s} born?", "in which year was the spouse of {s} born?"),
    ),
    _Chain(
        "founded_by",
        "born_in",
        ("where was the founder of {s} born?", "in which city was the founder of {s} born?"),
    ),
    _Chain(
        "founded_by",
        "birth_year",
        ("when was the founder of {s} born?", "in which year was the founder of {s} born?"),
    ),
    _Chain("founded_by", "occupation", ("what was the occupation of the founder of {s}?",)),
    _Chain(
        "headquarters",
        "located_in",
        ("in which country is {s} headquartered?", "in which country is the headquarters of {s}?"),
    ),
    _Chain(
        "author",
        "born_in",
        ("where was the author of {s} born?", "in which city was the author of {s} born?"),
    ),
    _Chain(
        "author",
        "birth_year",
        ("when was the author of {s} born?", "in which year was the author of {s} born?"),
    ),
    _Chain("author", "spouse", ("who was the spouse of the author of {s}?",)),
    _Chain("located_in", "capital", ("what is the capital of the country where {s} is?",)),
)


@dataclasses.dataclass(frozen=True)
class _Example:
  """A candidate example before sampling; `relations` is the path asked about from `subject`."""

  subject: int
  relations: tuple[str, ...]
  input: str
  outputs: tuple[dict, ...]

  @property
  def answer(self) -> str:
    return self.outputs[0]["answer"]


# ----------------------------------------------------------------------------
# Candidates per task.


def _provenance(world: World, mention: Mention) -> dict:
  return {
      "wikipedia_id": world.page_id(mention.page),
      "title": world.entities[mention.page].name,
      "section": mention.section,
      "start_paragraph_id": mention.paragraph,
      "start_character": mention.start,
      "end_paragraph_id": mention.paragraph,
      "end_character": mention.end,
      "bleu_score": 1.0,
  }


def _outputs(world: World, answer: str, hops: Sequence[Sequence[Mention]]) -> tuple[dict, ...]:
  """One KILT output per way of proving the answer: one mention of each hop's fact."""
  return tuple(
      {"answer": answer, "provenance": [_provenance(world, m) for m in proof]}
      for proof in itertools.product(*hops)
  )


def _single_hop(world: World) -> Iterator[tuple[int, str, int | str, str, tuple[dict, ...]]]:
  """(subject, relation, value, answer text, outputs) of every fact."""
  for entity, relation, value in world.facts():
    answer = world.value_text(relation, value)
    yield entity.index, relation, value, answer, _outputs(
        world, answer, [world.mentions[entity.index, relation]]
    )


def _nq(world: World, rng: random.Random) -> Iterator[_Example]:
  for subject, relation, _, _, outputs in _single_hop(world):
    for question in RELATIONS[relation].questions:
      yield _Example(subject, (relation,), question.format(s=world.entities[subject].name), outputs)


def _zsre(world: World, rng: random.Random) -> Iterator[_Example]:
  for subject, relation, _, _, outputs in _single_hop(world):
    text = f"{world.entities[subject].name}{ZSRE_SEPARATOR}{RELATIONS[relation].label}"
    yield _Example(subject, (relation,), text, outputs)


def _wrong_value(
    world: World, rng: random.Random, subject: int, relation: str, value: int | str
) -> int | str:
  """A similar but false object: a nearby year, another word, or a similar entity (not the subject)."""
  target = RELATIONS[relation].target
  if target == "year":
    return value + rng.choice((-5, -4, -3, -2, -1, 1, 2, 3, 4, 5))
  if target == "word":
    return rng.choice([w for w in RELATIONS[relation].words if w != value])
  return rng.choice(world.substitutes(value, exclude=subject))


def _fever(world: World, rng: random.Random) -> Iterator[_Example]:
  """A supported and a refuted claim per fact; refuted claims cite the paragraph with the true fact."""
  for subject, relation, value, answer, outputs in _single_hop(world):
    claim = RELATIONS[relation].claim
    name = world.entities[subject].name
    wrong = world.value_text(relation, _wrong_value(world, rng, subject, relation, value))
    for label, obj in ((SUPPORTS, answer), (REFUTES, wrong)):
      labelled = tuple({**output, "answer": label} for output in outputs)
      yield _Example(subject, (relation,), claim.format(s=name, o=obj), labelled)


def _hotpot(world: World, rng: random.Random) -> Iterator[_Example]:
  for entity in world.entities:
    for chain in _CHAINS:
      bridge = entity.facts.get(chain.first)
      value = None if bridge is None else world.entities[bridge].facts.get(chain.second)
      if value is None:
        continue
      hops = [world.mentions[entity.index, chain.first], world.mentions[bridge, chain.second]]
      outputs = _outputs(world, world.value_text(chain.second, value), hops)
      for question in chain.questions:
        yield _Example(
            entity.index, (chain.first, chain.second), question.format(s=entity.name), outputs
        )


_CANDIDATES = {"nq": _nq, "hotpotqa": _hotpot, "fever": _fever, "structured_zeroshot": _zsre}


# ----------------------------------------------------------------------------
# Splits and sampling.


def held_out_pairs(world: World) -> set[tuple[int, str]]:
  """(subject, relation) pairs reserved for dev; both directions of a symmetric fact go together,
  so "who did A marry?" in train cannot answer "who did B marry?" in dev."""
  rng = random.Random(f"lumenvq-demo-split-{world.seed}")
  decided: dict[tuple[int, str], bool] = {}
  dev = set()
  for entity, relation, value in world.facts():
    key = (entity.index, relation)
    if RELATIONS[relation].symmetric:
      key = min(key, (value, relation))
    if key not in decided:
      decided[key] = rng.random() < DEV_PAIR_FRACTION
    if decided[key]:
      dev.add((entity.index, relation))
  return dev


def _sample(candidates: list[_Example], size: int, rng: random.Random, what: str) -> list[_Example]:
  if len(candidates) < size:
    raise ValueError(
        f"the demo world has only {len(candidates)} candidates for {what}, {size} requested: "
        f"ask for fewer or raise --num_entities"
    )
  return rng.sample(candidates, size)


def _task_examples(
    world: World, task: str, dev_pairs: set, sizes: dict[str, int]
) -> dict[str, list[_Example]]:
  """Sampled examples per split; fever gets half SUPPORTS and half REFUTES in each split."""
  rng = random.Random(f"lumenvq-demo-{task}-{world.seed}")
  pools: dict[str, list[_Example]] = {split: [] for split in SPLITS}
  for example in _CANDIDATES[task](world, rng):
    pools["dev" if (example.subject, example.relations[0]) in dev_pairs else "train"].append(
        example
    )
  chosen = {}
  for split in SPLITS:
    if task != "fever":
      chosen[split] = _sample(pools[split], sizes[split], rng, f"{task} {split}")
      continue
    half = sizes[split] // 2
    chosen[split] = [
        e
        for label, n in ((SUPPORTS, sizes[split] - half), (REFUTES, half))
        for e in _sample(
            [e for e in pools[split] if e.answer == label], n, rng, f"{task} {split} {label}"
        )
    ]
    rng.shuffle(chosen[split])
  return chosen


def demo_records(world: World, train_size: int, dev_size: int) -> dict[str, list[dict]]:
  """File name -> records: the knowledge source, then each task's train and dev file."""
  files = {kilt.KNOWLEDGE_SOURCE_FILE: world.pages}
  dev_pairs = held_out_pairs(world)
  for task in TASK_NAMES:
    examples = _task_examples(world, task, dev_pairs, {"train": train_size, "dev": dev_size})
    for split in SPLITS:
      files[kilt.get_task(task).file(split)] = [
          {
              "id": f"demo-{task}-{split}-{i}",
              "input": e.input,
              "output": list(e.outputs),
              "meta": {
                  "subject_wikipedia_id": world.page_id(e.subject),
                  "relations": list(e.relations),
              },
          }
          for i, e in enumerate(examples[split])
      ]
  return files


# ----------------------------------------------------------------------------
# Files.


def _write_atomic(path: str, lines: Iterable[bytes]) -> dict:
  """Writes `path` whole or not at all (`paths.atomic_open`: local rename or one upload);
  returns its sha256 and line count."""
  digest, count = hashlib.sha256(), 0
  with paths.atomic_open(path, "wb") as f:
    for line in lines:
      digest.update(line)
      f.write(line)
      count += 1
  return {"sha256": digest.hexdigest(), "lines": count}


def _sha256(path: str) -> str | None:
  try:
    with paths.path(path).open("rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  except OSError:
    return None


def _matching_manifest(out_dir: str, settings: dict) -> dict | None:
  """The manifest in `out_dir` if it was written with `settings` and every file still matches it."""
  try:
    manifest = json.loads(paths.path(out_dir, MANIFEST_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict) or manifest.get("settings") != settings:
    return None
  files = manifest.get("files")
  if not isinstance(files, dict) or not files:
    return None
  for name, info in files.items():
    if not isinstance(info, dict) or _sha256(paths.join(out_dir, name)) != info.get("sha256"):
      return None
  return manifest


def write_demo(
    out_dir: str,
    seed: int = 0,
    num_entities: int = DEFAULT_NUM_ENTITIES,
    train_size: int = DEFAULT_TRAIN_SIZE,
    dev_size: int = DEFAULT_DEV_SIZE,
    force: bool = False,
) -> tuple[dict, bool]:
  """Write the demo files into `out_dir`; returns (manifest, whether anything was written).

  Skips the work when the manifest matches these settings and every file its hash,
  unless `force`. The old manifest is removed before any file is rewritten, and a
  request the world cannot satisfy fails before anything in `out_dir` changes.
  """
  for flag, value in (("train_size", train_size), ("dev_size", dev_size)):
    if value < 1:
      raise ValueError(f"--{flag} must be at least 1, got {value}")
  settings = {
      "format_version": FORMAT_VERSION,
      "seed": seed,
      "num_entities": num_entities,
      "train_size": train_size,
      "dev_size": dev_size,
  }
  paths.makedirs(out_dir)
  manifest_path = paths.path(out_dir, MANIFEST_FILE)
  if not force and (manifest := _matching_manifest(out_dir, settings)):
    logger.info("%s is up to date (%s matches %s); skipping", out_dir, MANIFEST_FILE, settings)
    return manifest, False
  start = time.perf_counter()
  files = demo_records(
      build_world(seed, num_entities), train_size, dev_size
  )  # fails before touching out_dir
  manifest_path.unlink(missing_ok=True)
  manifest = {"settings": settings, "files": {}}
  for name, records in files.items():
    lines = ((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records)
    manifest["files"][name] = info = _write_atomic(paths.join(out_dir, name), lines)
    logger.info(
        "wrote %s: %d %s",
        name,
        info["lines"],
        "pages" if name == kilt.KNOWLEDGE_SOURCE_FILE else "examples",
    )
  _write_atomic(manifest_path, [(json.dumps(manifest, indent=2) + "\n").encode("utf-8")])
  logger.info(
      "wrote %s; demo data for seed %d in %s after %.1f s",
      MANIFEST_FILE,
      seed,
      out_dir,
      time.perf_counter() - start,
  )
  return manifest, True


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.data.demo", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--out", required=True, help="output directory (local or gs://)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--num_entities",
      type=int,
      default=DEFAULT_NUM_ENTITIES,
      help="pages in the knowledge source (people, places, organisations, works)",
  )
  parser.add_argument(
      "--train_size", type=int, default=DEFAULT_TRAIN_SIZE, help="examples per task"
  )
  parser.add_argument("--dev_size", type=int, default=DEFAULT_DEV_SIZE, help="examples per task")
  parser.add_argument(
      "--force", action="store_true", help="regenerate even when the manifest matches"
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    write_demo(args.out, args.seed, args.num_entities, args.train_size, args.dev_size, args.force)
  except (OSError, ValueError) as err:
    parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
  main()
