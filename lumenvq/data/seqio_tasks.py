"""SeqIO tasks over KILT-format files: settings, examples, vocabulary, postprocessing, metrics.

`tasks/kilt.py` (every KILT task, `kilt_<task>`) and `tasks/demo.py` (the demo
world, `lumenvq_demo_<task>`) register their tasks with `register_task`; the
machinery is shared here. An example joins one record of the task's KILT file
with the same record of its retrieval file (`retrieve.read_retrieval`) and the
retrieved passages' texts (`PassageTable`):

    id           tf.string []      the KILT id (infer writes KILT prediction files with it)
    inputs       int32 [<= L]      the task's input_prefix + the question/claim, tokenized, EOS
    targets      int32 [<= L]      the first gold answer (FEVER: the label), tokenized, EOS;
                                   empty in the test split (KILT ships no answers)
    answers      tf.string []      every gold answer as a JSON list: `postprocess` returns it for
                                   is_target=True, and the metrics take the max over it
    passage_ids  int32 [K]         retrieved passage ids, best first, -1 padded
    passages     tf.string [K]     their texts (title-prefixed, as stored), "" for -1
    passage_tokens int32 [K, Lmax] the texts tokenized, each real passage ending in EOS (as the
                                   debug passage task's), 0-padded to this example's longest;
                                   all 0 for -1 (readers drop all-padding passages). Not cut:
                                   the reader's feature converter cuts them to its passage length
    inputs_pretokenized, targets_pretokenized   the strings (seqio's tokenize keeps them)

A consumer that reads passages by id only (LUMEN memory from a store) builds its dataset
inside `without_passage_texts()`: the examples then carry no `passages` and no
`passage_tokens`, and neither is looked up nor tokenized (most of an example's cost).

Train targets are the first gold answer, not one example per answer: KILT
lists the canonical answer first (aliases follow, in T-REx/zsRE up to dozens),
and one example per alias would weight questions by their number of aliases.

Splits are KILT's (train, dev, test) plus `validation`, an alias of dev,
because T5X's run files (and ours) evaluate on 'validation'.

Paths and K are resolved when a dataset is built, not when `tasks` is
imported (that happens before gin is parsed, and before the data may exist):
`TaskData.resolve` takes gin settings first, then the collection's environment
variable, then its default layout. The vocabulary is a `LazyVocabulary` for
the same reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from lumenvq import paths
from lumenvq.data import kilt, kilt_metrics, passage_tokens, retrieve, vocab
from lumenvq.data.passage_table import PassageTable
from lumenvq.data.passage_tokens import PassageTokens

DEFAULT_NUM_PASSAGES = 20
SPLITS = {
    "train": "train",
    "validation": "dev",
    "dev": "dev",
    "test": "test",
}  # seqio split -> KILT split


@dataclasses.dataclass(frozen=True)
class Layout:
  """A collection of tasks on disk: where its files are by default and the commands that make them.

  `root` is where passages/, retrieval/ and vocab/spm.model lie, relative to
  the data directory ("." for KILT's README layout, ".." for the demo's
  demo_out/{data,passages,retrieval,vocab}). The `*_command` strings are
  formatted with the paths for "not found" messages.
  """

  configurable: str  # the gin name of the settings, for messages
  env_var: str
  default_data_dir: str
  root: str
  data_command: str  # {data_dir} {task} {split}
  passages_flags: str = ""
  vocab_flags: str = ""  # {data_dir}


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Resolved settings of a collection: its directories, SentencePiece model and K."""

  layout: Layout
  data_dir: str
  passages_dir: str
  retrieval_dir: str
  vocabulary_path: str
  num_passages: int
  passage_tokens_dir: str | None = None  # None: `passage_tokens.default_dir`, used if built

  @classmethod
  def resolve(
      cls,
      layout: Layout,
      data_dir: str | None = None,
      passages_dir: str | None = None,
      retrieval_dir: str | None = None,
      vocabulary_path: str | None = None,
      num_passages: int = DEFAULT_NUM_PASSAGES,
      passage_tokens_dir: str | None = None,
  ) -> "TaskData":
    """Given settings win; a missing data_dir comes from the environment, then the default.

    Local paths are made absolute here, against the working directory at the time of resolution.
    """
    if isinstance(num_passages, bool) or not isinstance(num_passages, int) or num_passages < 1:
      raise ValueError(
          f"{layout.configurable}.num_passages must be a positive integer, got {num_passages!r}"
      )
    data_dir = _absolute(data_dir or os.environ.get(layout.env_var) or layout.default_data_dir)
    root = paths.path(data_dir)
    root = root.parent if layout.root == ".." else root.joinpath(layout.root)
    return cls(
        layout,
        data_dir,
        _absolute(passages_dir or paths.join(root, "passages")),
        _absolute(retrieval_dir or paths.join(root, "retrieval")),
        _absolute(vocabulary_path or paths.join(root, "vocab", "spm.model")),
        num_passages,
        passage_tokens_dir and _absolute(passage_tokens_dir),
    )

  @property
  def knowledge_source(self) -> str:
    return paths.join(self.data_dir, kilt.KNOWLEDGE_SOURCE_FILE)

  def kilt_file(self, task: kilt.KiltTask, split: str) -> str:
    """The task's KILT file of a KILT split; FileNotFoundError naming it and the command that makes it."""
    path = paths.join(self.data_dir, task.file(split))
    if not paths.path(path).is_file():
      command = self.layout.data_command.format(data_dir=self.data_dir, task=task.name, split=split)
      if task.download_file(split) != task.file(split):  # TriviaQA: ids only until restored
        command += (
            f" && python -m lumenvq.data.kilt restore_triviaqa --kilt_file "
            f"{paths.join(self.data_dir, task.download_file(split))} --triviaqa_files ... "
            f"--out {path}"
        )
      raise FileNotFoundError(
          f"KILT file {path} not found ({self._setting('data_dir')}); " f"make it with: {command}"
      )
    return path

  def retrieval_file(self, task: kilt.KiltTask, split: str) -> str:
    """The retrieval file for the task's split (`retrieve.output_path`), or an error with its command."""
    path = retrieve.output_path(self.retrieval_dir, task.file(split))
    if not paths.path(path).is_file():
      raise FileNotFoundError(
          f"retrieval file {path} not found ({self._setting('retrieval_dir')}); make it with: "
          f"python -m lumenvq.data.retrieve --passages {self.passages_dir} --data_dir {self.data_dir} "
          f"--tasks {task.name} --splits {split} --out {self.retrieval_dir} --k {self.num_passages}"
      )
    return path

  def passage_table(self) -> PassageTable:
    try:
      return PassageTable(self.passages_dir)
    except FileNotFoundError as err:
      raise FileNotFoundError(
          f"{err} ({self._setting('passages_dir')}); make it with: python -m lumenvq.data.passages "
          f"--knowledge_source {self.knowledge_source} --out {self.passages_dir}"
          f"{self.layout.passages_flags}"
      ) from None

  def passage_tokens(self, table: PassageTable) -> PassageTokens | None:
    """The table's pre-tokenized passages for this vocabulary (`lumenvq.data.passage_tokens`):
    from `passage_tokens_dir` when set (an error if not built there), else from their default
    place if they were built; None, and the tasks tokenize passage texts, otherwise."""
    directory = self.passage_tokens_dir
    if directory is None:
      directory = passage_tokens.default_dir(self.passages_dir, self.vocabulary_path)
      if not paths.path(directory, passage_tokens.MANIFEST).exists():
        _log_once(
            f"passages are tokenized as examples are read; pre-tokenized, they are looked up "
            f"(faster input): {passage_tokens.command(self.passages_dir, self.vocabulary_path)}"
        )
        return None
    try:
      return passage_tokens.PassageTokens(directory, table, self.vocabulary_path)
    except (FileNotFoundError, ValueError) as err:
      raise type(err)(f"{err} ({self._setting('passage_tokens_dir')})") from None

  def vocabulary(self) -> seqio.Vocabulary:
    """The SentencePiece vocabulary (loaded once per path), or an error with the command that trains it."""
    path = self.vocabulary_path
    if not paths.path(path).is_file():
      raise FileNotFoundError(
          f"SentencePiece model {path} not found ({self._setting('vocabulary_path')}); train it with: "
          f"python -m lumenvq.data.train_vocab --knowledge_source {self.knowledge_source} "
          f"--out {path.removesuffix('.model')}{self.layout.vocab_flags.format(data_dir=self.data_dir)} (or set "
          f"{self.layout.configurable}.vocabulary_path to any SentencePiece .model, such as T5's)"
      )
    return _load_vocabulary(path)

  def _setting(self, name: str) -> str:
    """Where a path came from, for messages."""
    if name == "data_dir":
      return (
          f"from gin {self.layout.configurable}.data_dir, else ${self.layout.env_var}, "
          f"else {self.layout.default_data_dir}"
      )
    return f"set gin {self.layout.configurable}.{name} to move it"


def _absolute(path: str) -> str:
  return paths.resolve(path)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  logging.info(message)


@functools.lru_cache(maxsize=None)
def _load_vocabulary(path: str) -> seqio.Vocabulary:
  return vocab.get_vocabulary(path)


class LazyVocabulary(seqio.Vocabulary):
  """A vocabulary that finds its SentencePiece model when first used, through `settings()`.

  SeqIO wants a Vocabulary object when a task is registered, which is at
  `import tasks`: before gin is parsed and maybe before the model is trained.
  Every call asks `settings()` (gin/environment, cheap) for the path and
  delegates to `vocab.get_vocabulary(path)`, loaded once per path. Tasks that
  share a collection share one instance, which is what seqio's mixtures
  compare (by identity) to check that their tasks' features agree.
  """

  def __init__(self, settings: Callable[[], TaskData]):
    super().__init__(extra_ids=0)
    self._settings = settings

  @property
  def vocabulary(self) -> seqio.Vocabulary:
    return self._settings().vocabulary()

  def __repr__(self) -> str:
    return f"LazyVocabulary({getattr(self._settings, '__name__', self._settings)})"

  # Everything is delegated: the public methods (so the delegate's own EOS/unk
  # handling applies once) and the abstract ones seqio.Vocabulary requires.
  bos_id = property(lambda self: self.vocabulary.bos_id)
  eos_id = property(lambda self: self.vocabulary.eos_id)
  unk_id = property(lambda self: self.vocabulary.unk_id)
  pad_id = property(lambda self: self.vocabulary.pad_id)
  extra_ids = property(lambda self: self.vocabulary.extra_ids)
  vocab_size = property(lambda self: self.vocabulary.vocab_size)
  _base_vocab_size = property(lambda self: self.vocabulary.vocab_size - self.vocabulary.extra_ids)

  def encode(self, s):
    return self.vocabulary.encode(s)

  def decode(self, ids):
    return self.vocabulary.decode(ids)

  def encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  _encode, _decode, _encode_tf, _decode_tf = encode, decode, encode_tf, decode_tf


# ----------------------------------------------------------------------------
# Examples.


def _line(path: str, index: int) -> int | None:
  """Line number of the `index`-th record of a jsonl file (0-based), for error messages only."""
  found = next(itertools.islice(kilt.iter_jsonl(path), index, None), None)
  return found and found[0]


def joined_records(
    kilt_path: str, retrieval_path: str, table: PassageTable, k: int, require_answers: bool = False
) -> Iterator[tuple[kilt.KiltRecord, np.ndarray]]:
  """(record, int32[k] passage ids) per record, both files streamed side by side.

  The retrieval file must hold the KILT file's ids in the KILT file's order
  (`lumenvq.data.retrieve` writes them so, as do KILT-format retrievers): the
  join is checked id by id, and a missing, extra or different id is an error
  naming both files and lines.
  """
  records = kilt.read_kilt(kilt_path, require_answers=require_answers)
  retrieved = retrieve.read_retrieval(retrieval_path, k, table)
  hint = (
      f"a retrieval file lists the ids of its KILT file in the same order; rerun "
      f"python -m lumenvq.data.retrieve for {kilt_path}"
  )
  for index, (record, hit) in enumerate(itertools.zip_longest(records, retrieved)):
    if hit is None:
      raise kilt.KiltFormatError(
          kilt_path,
          _line(kilt_path, index),
          f"id {record.id} has no retrieval: {retrieval_path} ends after "
          f"{index} records ({hint})",
      )
    if record is None:
      raise kilt.KiltFormatError(
          retrieval_path,
          _line(retrieval_path, index),
          f"id {hit[0]} is not in {kilt_path}, which ends after {index} records " f"({hint})",
      )
    if hit[0].strip() != record.id:
      raise kilt.KiltFormatError(
          kilt_path,
          _line(kilt_path, index),
          f"id {record.id}, but line {_line(retrieval_path, index)} of "
          f"{retrieval_path} has id {hit[0]} ({hint})",
      )
    yield record, hit[1]


# Whether the datasets built now carry passage texts (module doc). A context variable, not a
# setting of the task: seqio's get_dataset has no way to ask a task for fewer features, and
# the same registered task serves both kinds of consumer.
_PASSAGE_TEXTS = contextvars.ContextVar("passage_texts", default=True)


@contextlib.contextmanager
def without_passage_texts():
  """Datasets of KILT tasks built in this block have `passage_ids` but no passage texts."""
  token = _PASSAGE_TEXTS.set(False)
  try:
    yield
  finally:
    _PASSAGE_TEXTS.reset(token)


def _example(
    task: kilt.KiltTask,
    record,
    ids: np.ndarray,
    table: PassageTable | None,
    tokens: tuple[PassageTokens, int] | None = None,
) -> dict[str, Any]:
  """An example (module doc); without `passages` when `table` is None, with `passage_tokens`
  looked up when `tokens` (pre-tokenized passages and the EOS id) is given."""
  example = {
      "id": record.id,
      "inputs": task.input_prefix + record.input,
      "targets": record.answers[0] if record.answers else "",
      "answers": json.dumps(list(record.answers), ensure_ascii=False),
      "passage_ids": ids,
  }
  if table is not None:
    example["passages"] = table.texts(ids)
  if tokens is not None:
    example["passage_tokens"] = tokens[0].lookup(ids, tokens[1])
  return example


def kilt_examples(task: kilt.KiltTask, split: str, data: TaskData) -> Iterator[dict[str, Any]]:
  """The examples (strings and numpy, before tokenization) of a task's KILT split; see the module doc."""
  table = data.passage_table()
  for record, ids in _task_records(task, split, data):
    yield _example(task, record, ids, table)


def _task_records(task: kilt.KiltTask, split: str, data: TaskData):
  return joined_records(
      data.kilt_file(task, split),
      data.retrieval_file(task, split),
      data.passage_table(),
      data.num_passages,
      require_answers=split != "test",
  )


def indexed_dataset(
    example: Callable[[int], Mapping[str, Any]],
    size: int | None,
    signature: Mapping,
    batch: int = 32,
) -> tf.data.Dataset:
  """Examples `example(0)`, `example(1)`, ... (`size` None: endless) as a tf.data source
  whose iterators can be checkpointed.

  `tf.data.Dataset.from_generator` keeps its position in a Python generator, which a
  tf.data iterator checkpoint cannot hold; here the position is the index of a
  `range`/`counter` dataset and `example` a pure function of it, so a restored iterator
  (`training/input_checkpoint.py`) continues exactly, in constant time. One
  `numpy_function` call makes `batch` examples (a call per example cost as much as the
  example itself); a saved position holds at most one such batch. A feature whose
  signature has a None dimension comes out 0-padded to the longest of its batch.
  """
  keys = sorted(signature)

  def numpy_examples(indices):
    rows = [example(int(i)) for i in indices]
    return [_stack([r[k] for r in rows], signature[k].dtype.as_numpy_dtype) for k in keys]

  def lookup(indices):
    values = tf.numpy_function(
        numpy_examples, [indices], [signature[k].dtype for k in keys], stateful=False
    )
    return {k: tf.ensure_shape(v, [None, *signature[k].shape]) for k, v in zip(keys, values)}

  indices = tf.data.Dataset.counter() if size is None else tf.data.Dataset.range(size)
  return indices.batch(batch).map(lookup).unbatch()


def _stack(values: Sequence, dtype) -> np.ndarray:
  """Arrays of one rank stacked, each 0-padded to the largest in every dimension."""
  arrays = [np.asarray(v, dtype) for v in values]
  shapes = {a.shape for a in arrays}
  if len(shapes) == 1:
    return np.stack(arrays)
  out = np.zeros((len(arrays), *np.max(list(shapes), axis=0)), dtype)
  for i, a in enumerate(arrays):
    out[(i, *(slice(0, n) for n in a.shape))] = a
  return out


def _dataset_fn(
    split: str,
    shuffle_files: bool,
    seed=None,
    *,
    task: kilt.KiltTask,
    settings: Callable[[], TaskData],
) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split; seqio shuffles the examples when asked
  data = settings()
  kilt_split = SPLITS[split]
  # Missing files fail here, with plain errors, not inside tf.data (which wraps them) or seqio's tokenizer trace.
  data.kilt_file(task, kilt_split)
  data.retrieval_file(task, kilt_split)
  table = data.passage_table()
  data.vocabulary()
  k = data.num_passages
  records = list(_task_records(task, kilt_split, data))
  scalar = tf.TensorSpec((), tf.string)
  signature = {
      "id": scalar,
      "inputs": scalar,
      "targets": scalar,
      "answers": scalar,
      "passage_ids": tf.TensorSpec((k,), tf.int32),
  }
  tokens = None
  if _PASSAGE_TEXTS.get():
    signature["passages"] = tf.TensorSpec((k,), tf.string)
    if pretokenized := data.passage_tokens(table):
      tokens = pretokenized, data.vocabulary().eos_id
      signature["passage_tokens"] = tf.TensorSpec((k, None), tf.int32)
  else:
    table = None
  return indexed_dataset(
      lambda i: _example(task, *records[i], table, tokens), len(records), signature
  )


def tokenize_passages(
    dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]
) -> tf.data.Dataset:
  """A seqio preprocessor adding `passage_tokens` (module doc), with the vocabulary of `inputs`;
  examples without passage texts (`without_passage_texts`) pass unchanged, and pre-tokenized ones
  (`TaskData.passage_tokens`, padded to their batch of lookups) are cut to their longest passage."""
  if "passage_tokens" in dataset.element_spec:
    return dataset.map(_cut_to_longest, num_parallel_calls=tf.data.AUTOTUNE)
  if "passages" not in dataset.element_spec:
    return dataset
  vocabulary = output_features["inputs"].vocabulary

  def tokenize(features):
    tokens = vocabulary.encode_tf(features["passages"])  # ragged [K, None]
    eos = tf.where(features["passage_ids"] >= 0, vocabulary.eos_id, 0)[:, None]
    tokens = tf.concat([tokens, tf.RaggedTensor.from_tensor(eos)], axis=1)
    return {**features, "passage_tokens": tf.cast(tokens.to_tensor(), tf.int32)}

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def _cut_to_longest(features):
  tokens = features["passage_tokens"]
  longest = tf.reduce_max(tf.reduce_sum(tf.cast(tokens > 0, tf.int32), axis=1))
  return {**features, "passage_tokens": tokens[:, :longest]}


# ----------------------------------------------------------------------------
# Postprocessing and metrics.


def postprocess(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
  """A prediction passes through; a target becomes the list of every gold answer (`answers`)."""
  if not is_target:
    return output
  if example is None or "answers" not in example:
    raise ValueError(
        "the targets of a KILT task are postprocessed from the example's 'answers' feature, but "
        f"{'no example was given' if example is None else 'the example has none'}"
    )
  answers = example["answers"]
  return json.loads(answers.decode("utf-8") if isinstance(answers, bytes) else answers)


def downstream_metrics(
    targets: Sequence[Sequence[str] | str],
    predictions: Sequence[str],
    metrics: Sequence[str] = ("em", "f1"),
) -> dict[str, float]:
  """`metrics` of the KILT scorer's downstream report (fractions; max over each example's gold answers).

  Scored by `kilt_metrics.evaluate_downstream` itself, on records made from
  the lists, so numbers equal the official scorer's (an empty prediction
  scores 0; accuracy is exact string equality after stripping).
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  gold = [
      {"id": str(i), "output": [{"answer": a} for a in ([t] if isinstance(t, str) else t)]}
      for i, t in enumerate(targets)
  ]
  guess = [{"id": str(i), "output": [{"answer": p}]} for i, p in enumerate(predictions)]
  report = kilt_metrics.evaluate_downstream(gold, guess)["downstream"]
  return {name: report[name] for name in metrics}


def metric_fn(metrics: Sequence[str]) -> Callable[[Sequence, Sequence[str]], dict[str, float]]:
  """A seqio predict-metric fn (signature `(targets, predictions)`) for a task's KILT metrics."""

  def kilt_downstream(targets, predictions):
    return downstream_metrics(targets, predictions, metrics)

  return kilt_downstream


# ----------------------------------------------------------------------------
# Registration.


class KiltSeqioTask(seqio.Task):
  """A seqio Task whose predictions are written in KILT's format (`input_pipeline` reads `is_kilt`)."""

  is_kilt = True


def register_task(
    name: str,
    task: kilt.KiltTask,
    kilt_splits: Sequence[str],
    settings: Callable[[], TaskData],
    vocabulary: seqio.Vocabulary,
) -> None:
  """Register `name` for `task` over the given KILT splits; a name already registered is left as is."""
  if name in seqio.TaskRegistry.names():
    return
  features = {key: seqio.Feature(vocabulary, add_eos=True) for key in ("inputs", "targets")}
  splits = [s for s, kilt_split in SPLITS.items() if kilt_split in kilt_splits]
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          functools.partial(_dataset_fn, task=task, settings=settings), splits=splits
      ),
      preprocessors=[
          seqio.preprocessors.tokenize,
          tokenize_passages,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features,
      postprocess_fn=postprocess,
      metric_fns=[metric_fn(task.metrics)],
      task_cls=KiltSeqioTask,
  )


class KiltMixture(seqio.Mixture):
  """A seqio Mixture that keeps the features besides inputs/targets (a plain one drops them)."""

  is_kilt = True
  PASSTHROUGH_FEATURES = (
      "id",
      "answers",
      "passage_ids",
      "passages",
      "passage_tokens",
      "inputs_pretokenized",
      "targets_pretokenized",
  )

  def get_dataset(
      self, *args, passthrough_features: Sequence[str] | None = None, **kwargs
  ) -> tf.data.Dataset:
    if passthrough_features is None:
      passthrough_features = self.PASSTHROUGH_FEATURES
    return super().get_dataset(*args, passthrough_features=passthrough_features, **kwargs)


def register_mixture(name: str, task_names: Sequence[str]) -> None:
  """A mixture at equal rates: KILT's train sets range from 18k (AIDA) to 2.3M (T-REx) examples, and
  rates by size would give T-REx about 73% of every batch."""
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0, mixture_cls=KiltMixture)
