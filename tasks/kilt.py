"""SeqIO registration of every KILT task, `kilt_<task>` (all of `kilt.TASKS`), and `kilt_all`.

Files (the layout of the README's KILT commands; each setting can be moved):

    kilt_data.data_dir         the official KILT jsonl files    default: $KILT_DATA_DIR, else ./kilt
    kilt_data.passages_dir     python -m lumenvq.data.passages  default: DATA_DIR/passages
    kilt_data.retrieval_dir    python -m lumenvq.data.retrieve  default: DATA_DIR/retrieval
    kilt_data.vocabulary_path  any SentencePiece .model         default: DATA_DIR/vocab/spm.model
    kilt_data.num_passages     K passages per question          default: 20
    kilt_data.passage_tokens_dir  python -m lumenvq.data.passage_tokens (the passages tokenized
                               once; optional)   default: used from PASSAGES/tokens/<vocab> if built

gin parses its files before the CLIs import `tasks`, so a gin file that binds
`kilt_data.*` starts with `import tasks`. Examples and features:
`lumenvq.data.seqio_tasks`.
"""

from typing import Optional

import gin

from lumenvq.data import kilt, seqio_tasks

LAYOUT = seqio_tasks.Layout(
    configurable="kilt_data",
    env_var="KILT_DATA_DIR",
    default_data_dir="kilt",
    root=".",
    data_command="python -m lumenvq.data.download_kilt --tasks {task} --splits {split} --out {data_dir}",
    vocab_flags=" --vocab_size 32000",
)


@gin.configurable
def kilt_data(
    data_dir: Optional[str] = None,
    passages_dir: Optional[str] = None,
    retrieval_dir: Optional[str] = None,
    vocabulary_path: Optional[str] = None,
    num_passages: int = seqio_tasks.DEFAULT_NUM_PASSAGES,
    passage_tokens_dir: Optional[str] = None,
) -> seqio_tasks.TaskData:
  """Where the KILT tasks' files are (module doc); read when a dataset is built."""
  return seqio_tasks.TaskData.resolve(LAYOUT, **locals())  # every setting above, by name


def task_name(name: str) -> str:
  """`kilt_<task>` for a KILT task name; an unknown name lists the known ones."""
  return f"kilt_{kilt.get_task(name).name}"


VOCABULARY = seqio_tasks.LazyVocabulary(kilt_data)
for _task in kilt.TASKS.values():
  seqio_tasks.register_task(task_name(_task.name), _task, tuple(_task.files), kilt_data, VOCABULARY)
seqio_tasks.register_mixture("kilt_all", [task_name(name) for name in kilt.TASKS])
