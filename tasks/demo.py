r"""SeqIO registration of the demo world's tasks, `lumenvq_demo_<task>` for nq, hotpotqa, fever and
structured_zeroshot, the mixture `lumenvq_demo_all`, and `lumenvq_demo_single_hop` (nq and
structured_zeroshot: the demo recipe's curriculum).

The one command sequence that makes them usable (what `make demo` runs, from
the repository root; the files land where the defaults below look):

    python -m lumenvq.data.demo --out demo_out/data
    python -m lumenvq.data.passages --knowledge_source demo_out/data/kilt_knowledgesource.json \
        --out demo_out/passages --words 28
    python -m lumenvq.data.train_vocab --knowledge_source demo_out/data/kilt_knowledgesource.json \
        --out demo_out/vocab/spm --vocab_size 6000 --model_type=bpe --character_coverage=1.0 \
        --kilt_files=demo_out/data/nq-train-kilt.jsonl,demo_out/data/hotpotqa-train-kilt.jsonl,demo_out/data/fever-train-kilt.jsonl,demo_out/data/structured_zeroshot-train-kilt.jsonl
    python -m lumenvq.data.retrieve --passages demo_out/passages --data_dir demo_out/data \
        --tasks nq,hotpotqa,fever,structured_zeroshot --splits train,dev --out demo_out/retrieval --k 20

Settings (gin, after `import tasks` in the gin file; or the environment):

    demo_data.data_dir         default: $LUMENVQ_DEMO_DIR, else demo_out/data (relative to the working dir)
    demo_data.passages_dir     default: DATA_DIR/../passages
    demo_data.retrieval_dir    default: DATA_DIR/../retrieval
    demo_data.vocabulary_path  default: DATA_DIR/../vocab/spm.model (or any SentencePiece .model)
    demo_data.num_passages     K passages per question, default 20
    demo_data.passage_tokens_dir  the passages tokenized once (python -m lumenvq.data.passage_tokens;
                               optional), default: used from PASSAGES/tokens/<vocab> if built
"""

import os
from typing import Optional

import gin

from lumenvq.data import demo, kilt, seqio_tasks

LAYOUT = seqio_tasks.Layout(
    configurable="demo_data",
    env_var="LUMENVQ_DEMO_DIR",
    default_data_dir=os.path.join("demo_out", "data"),
    root="..",
    data_command="python -m lumenvq.data.demo --out {data_dir}",
    passages_flags=" --words 28",
    vocab_flags=" --vocab_size 6000 --model_type=bpe --character_coverage=1.0 --kilt_files "
    + ",".join("{data_dir}/" + kilt.get_task(t).file("train") for t in demo.TASK_NAMES),
)


@gin.configurable
def demo_data(
    data_dir: Optional[str] = None,
    passages_dir: Optional[str] = None,
    retrieval_dir: Optional[str] = None,
    vocabulary_path: Optional[str] = None,
    num_passages: int = seqio_tasks.DEFAULT_NUM_PASSAGES,
    passage_tokens_dir: Optional[str] = None,
) -> seqio_tasks.TaskData:
  """Where the demo tasks' files are (module doc); read when a dataset is built."""
  return seqio_tasks.TaskData.resolve(LAYOUT, **locals())  # every setting above, by name


def task_name(name: str) -> str:
  """`lumenvq_demo_<task>` for a demo task; another name is an error listing the demo tasks."""
  if name not in demo.TASK_NAMES:
    raise ValueError(f"unknown demo task {name!r}; demo tasks: {', '.join(demo.TASK_NAMES)}")
  return f"lumenvq_demo_{name}"


VOCABULARY = seqio_tasks.LazyVocabulary(demo_data)
for _name in demo.TASK_NAMES:
  seqio_tasks.register_task(
      task_name(_name), kilt.get_task(_name), demo.SPLITS, demo_data, VOCABULARY
  )
seqio_tasks.register_mixture("lumenvq_demo_all", [task_name(name) for name in demo.TASK_NAMES])
# The demo recipe's curriculum starts here: questions answered by one passage, which teach
# a reader trained from scratch to read before multi-hop questions and claims join.
seqio_tasks.register_mixture(
    "lumenvq_demo_single_hop", [task_name("nq"), task_name("structured_zeroshot")]
)
