"""Data pipeline speed and BM25 retrieval quality.

  python benchmarks/data.py [--synthetic_pages 20000] [--queries 2000] [--demo_words 28] [--no_demo]

1. Throughput on a synthetic knowledge source (Zipf-distributed pseudo-words,
   KILT page layout): passages built per second (100-word passages, one
   process), finalize time, BM25 index build time and batched queries/s.
2. On the demo world (`lumenvq.data.demo`, generated into a temp dir), with
   short passages (--demo_words): BM25 recall@K over each task's dev set,
   K = 1, 5, 10, 20: a question counts when a passage covering one of its gold
   provenance paragraphs (`PassageTable.passages_for`) is in its top K.

Prints two tables and writes benchmarks/results/data.json.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # pylint: disable=wrong-import-position

from lumenvq.data import kilt, passage_table, passages, retrieve  # pylint: disable=wrong-import-position

KS = (1, 5, 10, 20)
SYLLABLES = (
    "ka ri mo ten sul par vi lor an dem ush gra fel om tiq ber nos hal cu ze bo rin sta el".split()
)


def synthetic_source(path, num_pages, seed=0):
  """KILT-layout pages of Zipf-distributed pseudo-words (title, 4 paragraphs, 2 headings)."""
  rng = np.random.default_rng(seed)
  vocab = np.array(
      ["".join(rng.choice(SYLLABLES, rng.integers(1, 4))) + str(i % 7) for i in range(50_000)]
  )
  with open(path, "w") as f:
    for page in range(num_pages):
      words = vocab[np.minimum(rng.zipf(1.2, 320), len(vocab)) - 1]
      title = " ".join(words[:2]).title()
      body = [" ".join(words[i : i + 80]) + ".\n" for i in range(0, 320, 80)]
      text = [
          title + "\n",
          body[0],
          "Section::::History.\n",
          body[1],
          body[2],
          "Section::::Legacy.\n",
          body[3],
      ]
      f.write(
          json.dumps({"wikipedia_id": str(page), "wikipedia_title": title, "text": text}) + "\n"
      )


def throughput(tmp, num_pages, num_queries):
  source = os.path.join(tmp, "synthetic.json")
  synthetic_source(source, num_pages)
  megabytes = os.path.getsize(source) / 2**20
  start = time.perf_counter()
  manifest = passages.build(source, os.path.join(tmp, "synthetic_table"), words=100, progress=False)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  passages.finalize(os.path.join(tmp, "synthetic_table"), 1)
  finalize_s = time.perf_counter() - start
  table = passage_table.PassageTable(os.path.join(tmp, "synthetic_table"))
  n = manifest["num_passages"]
  rows = [
      {
          "step": "passages (build + finalize)",
          "items": n,
          "seconds": build_s,
          "per_second": n / build_s,
          "note": f"{num_pages / build_s:,.0f} pages/s, {megabytes / build_s:.1f} MB/s",
      },
      {
          "step": "finalize alone",
          "items": n,
          "seconds": finalize_s,
          "per_second": n / finalize_s,
          "note": "",
      },
  ]
  start = time.perf_counter()
  index = retrieve.Bm25Index.build(table, progress=False)
  index_s = time.perf_counter() - start
  rows.append(
      {
          "step": "BM25 index build",
          "items": n,
          "seconds": index_s,
          "per_second": n / index_s,
          "note": "passages/s, tokenize + index",
      }
  )
  rng = np.random.default_rng(1)
  sources = rng.choice(n, num_queries, replace=False if num_queries <= n else True)
  queries = [
      " ".join(rng.choice(table.text(int(i)).split(" context: ")[1].split(), 8)) for i in sources
  ]
  start = time.perf_counter()
  ids, _ = index.search(queries, k=100)
  query_s = time.perf_counter() - start
  rows.append(
      {
          "step": "BM25 queries (k=100)",
          "items": num_queries,
          "seconds": query_s,
          "per_second": num_queries / query_s,
          "note": f"8 words of a passage: it ranks first for {np.mean(ids[:, 0] == sources):.0%}",
      }
  )
  return rows


def gold_passages(table, record):
  gold = set()
  for prov in record.provenance:
    gold.update(
        int(i)
        for i in table.passages_for(
            prov.wikipedia_id, prov.start_paragraph_id, prov.end_paragraph_id
        )
    )
  return gold


def demo_recall(tmp, words, dev_size):
  from lumenvq.data import demo  # pylint: disable=import-outside-toplevel

  data = os.path.join(tmp, "demo")
  demo.write_demo(data, dev_size=dev_size)
  table_dir = os.path.join(tmp, "demo_table")
  passages.build(
      os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE), table_dir, words=words, progress=False
  )
  table = passage_table.PassageTable(table_dir)
  files = [os.path.join(data, kilt.get_task(t).file("dev")) for t in demo.TASK_NAMES]
  start = time.perf_counter()
  outputs = retrieve.run(
      table_dir, files, os.path.join(tmp, "demo_retrieval"), k=max(KS), progress=False
  )
  seconds = time.perf_counter() - start
  rows = []
  for task, path, out in zip(demo.TASK_NAMES, files, outputs):
    golds = {r.id: gold_passages(table, r) for r in kilt.read_kilt(path)}
    hits = np.array(
        [
            [bool(golds[rid] & set(ids[:k].tolist())) for k in KS]
            for rid, ids in retrieve.read_retrieval(out, max(KS), table)
        ]
    )
    rows.append(
        {
            "task": task,
            "questions": len(hits),
            **{f"R@{k}": float(v) for k, v in zip(KS, hits.mean(0))},
        }
    )
  return rows, {
      "demo_passages": len(table),
      "demo_pages": table.num_pages,
      "demo_words": words,
      "demo_retrieval_seconds": seconds,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--synthetic_pages", type=int, default=20_000)
  parser.add_argument("--queries", type=int, default=2_000)
  parser.add_argument(
      "--demo_words", type=int, default=28, help="words per passage on the demo world"
  )
  parser.add_argument("--dev_size", type=int, default=500, help="demo dev questions per task")
  parser.add_argument("--no_demo", action="store_true")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    speed = throughput(tmp, args.synthetic_pages, args.queries)
    report.print_table(speed, ["step", "items", "seconds", "per_second", "note"])
    recall, extra = [], {}
    if not args.no_demo:
      recall, extra = demo_recall(tmp, args.demo_words, args.dev_size)
      print(
          f"\nBM25 on the demo world: {extra['demo_passages']} passages of {args.demo_words} words "
          f"from {extra['demo_pages']} pages, dev sets"
      )
      report.print_table(recall, ["task", "questions", *(f"R@{k}" for k in KS)])
  report.write_results("data", speed, recall=recall, settings=vars(args), **extra)


if __name__ == "__main__":
  main()
