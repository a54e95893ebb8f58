"""Corpus scale on one machine: millions of passages through the data pipeline and BM25, and
memory stores of many shards read at random.

  python benchmarks/corpus_scale.py [--passages 5000000] [--queries 2000] [--store_shards 1024]

1. A synthetic knowledge source of `--passages` 100-word passages (benchmarks/data.py's
   Zipf pages, 4 passages a page) through `lumenvq.data.passages` (2 processes) and the
   BM25 index of `lumenvq.data.retrieve` (built, saved, then loaded memory-mapped and
   queried with k = 100). Each stage runs in a fresh process, so its peak RSS (the
   kernel's high-water mark, its worker processes included) is its own.
2. Random batches (32 questions x 20 passages) from a LUMEN-VQ code store of
   `--store_shards` shards (more than the reader keeps open at once,
   `shard_rows.MAX_OPEN_SHARDS`) against one of 16 shards, same rows and shard size, read
   in turns through `MemoryStore.read`, and the many-shard store again with the reader held
   to 256 open shards (its limit while each map held a file descriptor), which shows what
   reopening shards costs. Both stores sit in the page cache.

Prints the tables, then the arithmetic for KILT's 22M passages from the measured rates, and
writes benchmarks/results/corpus_scale.json.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # pylint: disable=wrong-import-position
import report  # pylint: disable=wrong-import-position

KILT_PASSAGES = 22_000_000  # About 22M 100-word passages from KILT's 5.9M Wikipedia pages.
BATCH = (32, 20)
STORE_ROW = (16, 32)  # Tokens x uint8 codes of a passage (512 bytes).
SHARD_PASSAGES = 256


def _peak_rss_gib() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return max(own, children) / 2**20  # ru_maxrss is in KiB on Linux.


def _in_fresh_process(fn, *args):
  """fn(*args) in a new process: (its result, its peak RSS in GiB)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(_measured, fn, *args).result()


def _measured(fn, *args):
  result = fn(*args)
  return result, _peak_rss_gib()


def _source(path, pages):
  start = time.perf_counter()
  data.synthetic_source(path, pages)
  return time.perf_counter() - start


def _passages(source, table_dir):
  from lumenvq.data import passages  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  manifest = passages.build(source, table_dir, words=100, num_shards=8, processes=2)
  return manifest["num_passages"], time.perf_counter() - start


def _index(table_dir, index_dir):
  from lumenvq.data import passage_table, retrieve  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  retrieve.Bm25Index.load_or_build(passage_table.PassageTable(table_dir), index_dir)
  return time.perf_counter() - start


def _queries(table_dir, index_dir, num_queries):
  from lumenvq.data import passage_table, retrieve  # pylint: disable=import-outside-toplevel

  table = passage_table.PassageTable(table_dir)
  start = time.perf_counter()
  index = retrieve.Bm25Index.load(index_dir)
  load_s = time.perf_counter() - start
  rng = np.random.default_rng(1)
  sources = rng.choice(len(table), num_queries, replace=False)
  words = [table.text(int(i)).split(" context: ")[1].split() for i in sources]
  queries = [" ".join(rng.choice(w, 8)) for w in words]
  start = time.perf_counter()
  ids, _ = index.search(queries, k=100)
  return load_s, time.perf_counter() - start, float(np.mean(ids[:, 0] == sources))


def _dir_gib(path) -> float:
  total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  return total / 2**30


def bench_corpus(tmp, num_passages, num_queries):
  source, table_dir = os.path.join(tmp, "source.json"), os.path.join(tmp, "table")
  index_dir = os.path.join(tmp, "retrieval", "bm25_index")
  pages = num_passages // 4
  source_s, source_rss = _in_fresh_process(_source, source, pages)
  print(
      f"synthetic source: {pages:,} pages, {os.path.getsize(source) / 2**30:.2f} GiB, "
      f"{source_s:.0f} s",
      flush=True,
  )
  (n, build_s), build_rss = _in_fresh_process(_passages, source, table_dir)
  os.remove(source)
  print(f"passages: {n:,} in {build_s:.0f} s", flush=True)
  index_s, index_rss = _in_fresh_process(_index, table_dir, index_dir)
  print(f"BM25 index: {index_s:.0f} s, peak RSS {index_rss:.1f} GiB", flush=True)
  (load_s, query_s, first), query_rss = _in_fresh_process(
      _queries, table_dir, index_dir, num_queries
  )
  return [
      {
          "stage": "passages (build + finalize, 2 processes)",
          "items": n,
          "seconds": build_s,
          "per_second": n / build_s,
          "peak_rss_gib": build_rss,
          "disk_gib": _dir_gib(table_dir),
      },
      {
          "stage": "BM25 index build + save",
          "items": n,
          "seconds": index_s,
          "per_second": n / index_s,
          "peak_rss_gib": index_rss,
          "disk_gib": _dir_gib(index_dir),
      },
      {
          "stage": f"BM25 load (mmap) + queries, k=100 (top-1 is the source: {first:.0%})",
          "items": num_queries,
          "seconds": load_s + query_s,
          "per_second": num_queries / query_s,
          "peak_rss_gib": query_rss,
          "disk_gib": 0.0,
      },
  ]


def _code_store(path, num_shards):
  from lumenvq.memory.memory_store import MemoryStore  # pylint: disable=import-outside-toplevel

  n = num_shards * SHARD_PASSAGES
  tokens, width = STORE_ROW
  store = MemoryStore.create(
      path,
      kind="codes",
      num_passages=n,
      passage_length=tokens,
      width=width,
      dtype="uint8",
      fingerprint={"benchmark": "corpus_scale"},
      codebooks=np.zeros((width, 256, 2), np.float32),
      shard_passages=SHARD_PASSAGES,
  )
  rng = np.random.default_rng(0)
  for shard in range(num_shards):
    first, stop = store.shard_range(shard)
    codes = rng.integers(0, 256, (stop - first, tokens, width), np.uint8)
    store.write_shard(shard, codes, np.full(stop - first, tokens, np.int32))
  store.finalize()


def bench_stores(tmp, many_shards, num_batches, repeats):
  """Random reads of the 16-shard store and of the many-shard one, this reader's open-shard
  limit and the 256 it had while each map held a file descriptor (so reopening cost)."""
  from lumenvq.memory import shard_rows  # pylint: disable=import-outside-toplevel
  from lumenvq.memory.memory_store import MemoryStore  # pylint: disable=import-outside-toplevel

  paths = {k: os.path.join(tmp, f"store{k}") for k in (16, many_shards)}
  for k, path in paths.items():
    _code_store(path, k)
  limit = shard_rows.MAX_OPEN_SHARDS
  cases = {(16, limit): None, (many_shards, 256): None, (many_shards, limit): None}
  rng = np.random.default_rng(2)
  fns = {}
  for shards, open_limit in cases:
    store = MemoryStore.open(paths[shards])
    batches = rng.integers(0, store.num_passages, (num_batches, BATCH[0] * BATCH[1]))

    def run(store=store, batches=batches, open_limit=open_limit):
      shard_rows.MAX_OPEN_SHARDS = open_limit
      for ids in batches:
        store.read(ids)

    fns[(shards, open_limit)] = run
  seconds = report.best_times(fns, repeats, in_turns=True)
  shard_rows.MAX_OPEN_SHARDS = limit
  passages = num_batches * BATCH[0] * BATCH[1]
  return [
      {
          "store": f"{shards} shards of {SHARD_PASSAGES} passages, {open_limit} open at most",
          "shards": shards,
          "max_open_shards": open_limit,
          "passages_per_s": passages / t,
          "ratio_to_16": seconds[(16, limit)] / t,
      }
      for (shards, open_limit), t in seconds.items()
  ]


def arithmetic(corpus_rows, passages_per_shard: int = 4096) -> list:
  """KILT's 22M passages at the measured rates and sizes (linear in passages)."""
  build, index, _ = corpus_rows
  scale = KILT_PASSAGES / build["items"]
  store_shards = -(-KILT_PASSAGES // passages_per_shard)
  return [
      {
          "quantity": "passages build (2 processes)",
          "value": f"{build['seconds'] * scale / 60:.0f} min",
      },
      {"quantity": "passage table on disk", "value": f"{build['disk_gib'] * scale:.1f} GiB"},
      {"quantity": "BM25 index build", "value": f"{index['seconds'] * scale / 60:.0f} min"},
      {
          "quantity": "BM25 index build peak RSS",
          "value": f"{index['peak_rss_gib'] * scale:.1f} GiB",
      },
      {
          "quantity": "BM25 index on disk (memory-mapped to query)",
          "value": f"{index['disk_gib'] * scale:.1f} GiB",
      },
      {
          "quantity": "memory store shards (4,096 passages each)",
          "value": f"{store_shards:,}",
      },
      {
          "quantity": "LUMEN-VQ codes at 16x (256 tokens x 64 uint8 a passage)",
          "value": f"{KILT_PASSAGES * 256 * 64 / 2**30:,.0f} GiB",
      },
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--passages", type=int, default=5_000_000)
  parser.add_argument("--queries", type=int, default=2_000)
  parser.add_argument("--store_shards", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tmp", default=None, help="working directory (default: a temp dir)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    stores = bench_stores(tmp, args.store_shards, args.batches, args.repeats)
    report.print_table(stores, ["store", "passages_per_s", "ratio_to_16"])
    corpus = bench_corpus(tmp, args.passages, args.queries)
    report.print_table(
        corpus, ["stage", "items", "seconds", "per_second", "peak_rss_gib", "disk_gib"]
    )
  kilt = arithmetic(corpus)
  print(f"\nKILT's {KILT_PASSAGES:,} passages at these rates:")
  report.print_table(kilt, ["quantity", "value"])
  report.write_results(
      "corpus_scale", corpus, stores=stores, kilt_arithmetic=kilt, settings=vars(args)
  )


if __name__ == "__main__":
  main()
