"""The precomputed memory store against plain baselines, side by side in one run (this
machine is a noisy shared CPU, so the ratios matter more than the absolute rates).

  python benchmarks/memory_store.py [--passages 16384] [--demo_entities 2500]

1. Precompute passages/s: `lumenvq.precompute_memory.precompute` end to end (checkpoint
   restore, compile, tokenization, store writes) of the tiny LUMEN reader and of LUMEN-VQ
   at C = 256 over the passage table of a generated demo world, and of LUMEN-VQ at
   C = 65,536 over a smaller one (its encode, C*d multiply-adds a token, runs at ~10
   passages/s on this CPU). Checkpoints: initial parameters, codebooks drawn at random and
   marked initialized (what precompute needs of a trained one).
2. Bytes per memory token on disk (`MemoryStore.bytes_on_disk`: everything, metadata and
   codebooks included) of synthetic LUMEN-VQ code stores at two 16x settings of d = 512
   (G = 32 uint16 codes of C = 65,536; G = 64 uint8 codes of C = 256) against raw bf16
   (d*2 bytes a token) and against a LUMEN store of bf16 vectors of the same passages (which
   zstd shrinks). The codebooks are a fixed cost (134 MB at C = 65,536, 0.5 MB at C = 256)
   that a corpus amortises; the ratios without them are given too.
3. Host reads: random batches of passage ids through `MemoryStore.read` and
   `HostMemoryReader` (synchronous, and streamed with read-ahead) against numpy
   fancy-indexing of a memmap of the same codes and lengths (.npy), from the G = 32 store
   (4 KB a passage) and from one of the published shape (256 tokens x 256 uint16 codes,
   128 KB a passage). Both read files that sit in the page cache. Each batch is taken and
   let go, as a training loop does, so every reader may reuse its buffers.
4. Device gather + dequantize: `memory_table.load`, then `memory_table.gather` and
   `pq_codec.decode` jitted, on a 1-device and the 8-device CPU mesh, and the dequantize
   alone of the same codes on the devices, against `faiss.ProductQuantizer.decode` of the
   same codes with the same codebooks (checked equal) and a plain `np.copyto` of the output
   size (float32 vectors). The target is the dequantize's; gather + dequantize is shown.

Writes benchmarks/results/memory_store.json (the targets' rows, then every section) and .png.
"""

import argparse
import functools
import os
import sys
import tempfile
import time

# Before jax is imported: the 8-device mesh of section 4 is 8 host-platform devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import faiss
import gin
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report

from lumenvq import precompute_memory
from lumenvq.data import demo, kilt, passages, vocab
from lumenvq.memory import memory_table
from lumenvq.memory.host_reader import HostMemoryReader
from lumenvq.memory.memory_store import MemoryStore
from lumenvq.model import reader_models
from lumenvq.model.network_config import T5Config
from lumenvq.model.reader_config import ReaderConfig
from lumenvq.quant import pq_codec
from lumenvq.training import checkpoints, gin_cli, optimizers, partitioning, trainer

# pylint: enable=wrong-import-position

RULES = partitioning.standard_logical_axis_rules()
TINY = ["gin_configs/models/tiny.gin", "gin_configs/architectures/lumen_vq.gin"]
D, LP = 512, 64  # Sections 2-4: d_model and memory tokens per passage.
CODE_SETTINGS = {"G32_C65536": (32, 65536), "G64_C256": (64, 256)}  # Both 16x over bf16.
PRECOMPUTE_RUNS = (
    ("lumen", 65536, "large"),
    ("lumen_vq", 256, "large"),
    ("lumen_vq", 65536, "small"),
)  # (architecture, C, demo world)
TARGETS = {"compression": 15.0, "host_reader": 0.5, "dequantize": 1.0}


def tiny_model(architecture: str, passage_length: int, codebook_size: int):
  """The reader of tiny.gin + lumen_vq.gin with `architecture` and C bound."""
  with gin.unlock_config():
    gin.clear_config()
    gin_cli.parse_gin(
        TINY,
        [
            f"ReaderConfig.architecture = '{architecture}'",
            f"ReaderConfig.passage_length = {passage_length}",
            f"ReaderConfig.codebook_size = {codebook_size}",
        ],
    )
    try:
      return reader_models.ReaderModel()
    finally:
      gin.clear_config()


def save_checkpoint(model, model_dir: str, step: int = 1) -> None:
  """A LUMEN-VQ checkpoint at `step`: initial parameters, random initialized codebooks."""
  t = trainer.Trainer(model, optimizers.make_optimizer(), partitioning.make_mesh(), RULES)
  state = t.init_state()
  q = dict(state.model_state["quantizer"]["quantizer"])
  codebooks = np.random.default_rng(0).normal(size=q["codebooks"].shape).astype(np.float32)
  q["codebooks"] = jax.device_put(codebooks, q["codebooks"].sharding)
  q["initialized"] = jax.device_put(np.ones((), bool), q["initialized"].sharding)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
  ckpt.save(step, state.replace(model_state={"quantizer": {"quantizer": q}}))
  ckpt.wait()
  ckpt.close()


def demo_table(tmp: str, name: str, entities: int) -> tuple:
  """(passage table dir, knowledge source) of a generated demo world."""
  data, table = os.path.join(tmp, f"{name}_demo"), os.path.join(tmp, f"{name}_passages")
  demo.write_demo(data, num_entities=entities, train_size=1, dev_size=1)
  source = os.path.join(data, kilt.KNOWLEDGE_SOURCE_FILE)
  passages.build(source, table, words=28, progress=False)
  return table, source


def bench_precompute(
    tmp: str, entities: int, small_entities: int, passage_length: int, batch_size: int
) -> list:
  """End-to-end precompute runs; LUMEN-VQ at C = 65,536 on the small world: encoding is
  C*d multiply-adds per token, which this CPU does at ~10 passages/s."""
  tables = {
      "large": demo_table(tmp, "large", entities),
      "small": demo_table(tmp, "small", small_entities),
  }
  spm = vocab.train_sentencepiece(
      tables["large"][1], os.path.join(tmp, "vocab", "spm"), vocab_size=1000, max_sentences=None
  )
  # Once per process, seconds long, and not the job's work: imported before any clock starts.
  import seqio  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel

  rows = []
  for architecture, c, world in PRECOMPUTE_RUNS:
    model = tiny_model(architecture, passage_length, c)
    model_dir = os.path.join(tmp, f"model_{c}")
    if not os.path.exists(model_dir):  # LUMEN restores the parameters of LUMEN-VQ's.
      save_checkpoint(tiny_model("lumen_vq", passage_length, c), model_dir)
    path = os.path.join(tmp, f"precompute_{architecture}_{c}")
    start = time.perf_counter()
    precompute_memory.precompute(
        model_dir=model_dir,
        model=model,
        store_path=path,
        passages_dir=tables[world][0],
        vocabulary_path=spm,
        batch_size=batch_size,
        progress=False,
    )
    seconds = time.perf_counter() - start
    store = MemoryStore.open(path)
    reader, t5 = model.reader, model.config
    rows.append(
        {
            "architecture": architecture,
            "passages": store.num_passages,
            "passage_length": passage_length,
            "d": t5.emb_dim,
            "quantizer": (
                f"G={reader.subspaces(t5.emb_dim)} C={c}" if architecture == "lumen_vq" else "-"
            ),
            "stored": f"{store.dtype.name} x {store.width}",
            "seconds": seconds,
            "passages_per_s": store.num_passages / seconds,
        }
    )
  return rows


def write_store(path, values_of, lengths, kind, dtype, width, codebooks=None, passage_length=LP):
  """A store of `values_of(start, stop)` rows, shard by shard; (opened store, seconds)."""
  start = time.perf_counter()
  store = MemoryStore.create(
      path,
      kind=kind,
      num_passages=len(lengths),
      passage_length=passage_length,
      width=width,
      dtype=dtype,
      fingerprint={"benchmark": kind},
      codebooks=codebooks,
  )
  for shard in range(store.num_shards):
    first, stop = store.shard_range(shard)
    store.write_shard(shard, values_of(first, stop), lengths[first:stop])
  store.finalize()
  return MemoryStore.open(path), time.perf_counter() - start


def _dir_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def bench_storage(tmp: str, n: int) -> tuple:
  """(rows, {setting: (store, codes, codebooks)}) of the code stores and the vector store."""
  rng = np.random.default_rng(1)
  lengths = np.full(n, LP, np.int32)  # Every position real: bytes per stored token.
  t5 = T5Config(emb_dim=D, dtype="bfloat16")
  stores, rows = {}, []
  # One random shard of vectors repeated: zstd compresses each passage's chunk on its own.
  block = rng.standard_normal((4096, LP, D), np.float32).astype(ml_dtypes.bfloat16)
  vectors, vector_s = write_store(
      os.path.join(tmp, "lumen_bf16"),
      lambda a, b: block[: b - a],
      lengths,
      "vectors",
      "bfloat16",
      D,
  )
  vector_bpt = vectors.bytes_on_disk() / (n * LP)
  rows.append(
      {
          "store": "lumen bf16 vectors (zstd)",
          "bytes_on_disk": vectors.bytes_on_disk(),
          "codebook_bytes": 0,
          "payload_B_per_token": D * 2,
          "B_per_token": vector_bpt,
          "B_per_token_without_codebooks": vector_bpt,
          "nominal_ratio": 1.0,
          "write_s": vector_s,
      }
  )
  for name, (g, c) in CODE_SETTINGS.items():
    reader = ReaderConfig(architecture="lumen_vq", num_subspaces=g, codebook_size=c)
    dtype = pq_codec.code_dtype(c)
    codes = rng.integers(0, c, (n, LP, g), dtype=dtype)
    codebooks = rng.standard_normal((g, c, D // g), np.float32)
    path = os.path.join(tmp, name)
    store, seconds = write_store(
        path, lambda a, b: codes[a:b], lengths, "codes", dtype, g, codebooks
    )
    total, books = store.bytes_on_disk(), _dir_bytes(os.path.join(path, "codebooks"))
    bpt, bpt_amortised = total / (n * LP), (total - books) / (n * LP)
    rows.append(
        {
            "store": f"lumen_vq {name} {dtype.name}",
            "C": c,
            "bytes_on_disk": total,
            "codebook_bytes": books,
            "payload_B_per_token": reader.memory_bytes_per_token(t5),
            "B_per_token": bpt,
            "B_per_token_without_codebooks": bpt_amortised,
            "nominal_ratio": reader.compression_ratio(t5),
            "ratio_vs_lumen_store": vector_bpt / bpt,
            "ratio_vs_lumen_store_without_codebooks": vector_bpt / bpt_amortised,
            "ratio_vs_raw_bf16": D * 2 / bpt,
            "ratio_vs_raw_bf16_without_codebooks": D * 2 / bpt_amortised,
            "write_s": seconds,
        }
    )
    stores[name] = (store, codes, codebooks)
  return rows, stores


def bench_host(tmp, label, store, codes, shapes, num_batches, repeats, rng) -> list:
  """Passages/s of reading `num_batches` random batches of ids [B, K] (each of `shapes`)
  from `store` of `codes`, the readers taking turns with a memmap of the codes."""
  np.save(os.path.join(tmp, f"{label}_codes.npy"), codes)
  np.save(os.path.join(tmp, f"{label}_lengths.npy"), np.full(len(codes), codes.shape[1], np.int32))
  mapped = np.load(os.path.join(tmp, f"{label}_codes.npy"), mmap_mode="r")
  mapped_lengths = np.load(os.path.join(tmp, f"{label}_lengths.npy"), mmap_mode="r")
  return [
      {"codes": label, **row}
      for b, k in shapes
      for row in _host_rates(
          store, mapped, mapped_lengths, rng.integers(0, len(codes), (num_batches, b, k)), repeats
      )
  ]


def _consume(batches) -> None:
  """Takes each batch and lets it go, as a training loop does (so buffers are reused)."""
  for _ in batches:
    pass


def _host_rates(store, mapped, mapped_lengths, batches: np.ndarray, repeats: int) -> list:
  reader = HostMemoryReader(store, batches.shape[2], read_ahead=0)
  streamed = HostMemoryReader(store, batches.shape[2], read_ahead=2)
  fns = {
      "numpy memmap [ids]": lambda: _consume((mapped[ids], mapped_lengths[ids]) for ids in batches),
      "MemoryStore.read": lambda: _consume(store.read(ids) for ids in batches),
      "HostMemoryReader.add_memory": lambda: _consume(
          reader.add_memory({"passage_ids": ids}) for ids in batches
      ),
      "HostMemoryReader.wrap, read_ahead=2": lambda: _consume(
          streamed.wrap({"passage_ids": ids} for ids in batches)
      ),
  }
  np.testing.assert_array_equal(store.read(batches[0])[0], mapped[batches[0]])  # Same rows.
  # In turns: a reader timed again right after itself finds its 50 batches' rows in the
  # cache (they fit), which the memmap's single copy gains from most.
  seconds = report.best_times(fns, repeats, in_turns=True)
  ids, row_bytes = batches.size, mapped[0].nbytes
  base = ids / seconds["numpy memmap [ids]"]
  return [
      {
          "reader": name,
          "ids_per_batch": f"{batches.shape[1]}x{batches.shape[2]}",
          "passages_per_s": ids / s,
          "MB_per_s": ids * row_bytes / s / 1e6,
          "ratio_vs_memmap": ids / s / base,
      }
      for name, s in seconds.items()
  ]


def _faiss_pq(codebooks: np.ndarray):
  """faiss.ProductQuantizer with our codebooks: its centroids are [M, ksub, dsub] too."""
  g, c, s = codebooks.shape
  pq = faiss.ProductQuantizer(g * s, g, int(np.log2(c)))
  faiss.copy_array_to_vector(codebooks.ravel(), pq.centroids)
  return pq


def _under(mesh, fn, *args):
  with jax.set_mesh(mesh):
    return fn(*args)


def bench_device(name, store, codebooks, ids: np.ndarray, rounds: int, repeats: int) -> list:
  """Vectors/s and output GB/s, on 1 and 8 devices, of gather + dequantize of `ids` [B, K]
  (the device reader's step), of dequantize alone (the same codes already on the devices,
  batch-sharded as the gather leaves them) and of the gather alone (its output: the codes);
  against FAISS decode of the same codes and a memory copy of the float32 output."""
  host_codes = store.read(ids)[0]
  meshes, outputs = {}, {}
  for devices in (1, 8):
    mesh = partitioning.make_mesh((devices, 1), devices=jax.devices()[:devices])
    table = memory_table.load(store, mesh, RULES)
    books = jax.device_put(codebooks, NamedSharding(mesh, P()))
    meshes[devices] = mesh, table, books
    outputs[devices] = np.asarray(
        _under(
            mesh, _GATHER_DEQUANTIZE, table, books, jax.device_put(ids, NamedSharding(mesh, P()))
        )
    )
  codes = host_codes.reshape(-1, store.width)
  raw = np.ascontiguousarray(codes).view(np.uint8).reshape(len(codes), -1)  # FAISS' layout.
  pq = _faiss_pq(codebooks)
  source = outputs[1].reshape(len(codes), D)
  np.testing.assert_allclose(pq.decode(raw), source, rtol=1e-6)  # The same vectors.
  np.testing.assert_array_equal(outputs[1], outputs[8])

  def fresh():  # Each round: fresh copies of every input.
    fns = {}
    for devices, (mesh, table, books) in meshes.items():
      key = f"{devices} device{'s' if devices > 1 else ''}"
      placed = jax.device_put(ids, NamedSharding(mesh, P()))
      gathered = jax.device_put(host_codes, NamedSharding(mesh, P(memory_table.BATCH_MESH_AXIS)))
      fns[f"gather+dequantize, {key}"] = functools.partial(
          _under, mesh, _GATHER_DEQUANTIZE, table, books, placed
      )
      fns[f"dequantize, {key}"] = functools.partial(_under, mesh, _DEQUANTIZE, gathered, books)
      fns[f"gather alone, {key}"] = functools.partial(_under, mesh, _GATHER, table, placed)
    theirs, target = np.array(raw), np.empty_like(source)
    fns["faiss.ProductQuantizer.decode"] = lambda: pq.decode(theirs)
    fns["np.copyto of the output"] = lambda: np.copyto(target, source)
    return fns

  seconds = report.best_of_rounds(fresh, rounds, repeats)
  n, faiss_rate = len(codes), len(codes) / seconds["faiss.ProductQuantizer.decode"]
  code_bytes = store.width * store.dtype.itemsize
  return [
      {
          "codes": name,
          "what": what,
          "vectors": n,
          "vectors_per_s": n / s,
          "output_GB_per_s": n
          * (code_bytes if what.startswith("gather alone") else D * 4)
          / s
          / 1e9,
          "ratio_vs_faiss": n / s / faiss_rate,
      }
      for what, s in seconds.items()
  ]


_GATHER = jax.jit(lambda table, ids: memory_table.gather(table, ids)[0])
_DEQUANTIZE = jax.jit(pq_codec.decode)
_GATHER_DEQUANTIZE = jax.jit(
    lambda table, books, ids: pq_codec.decode(memory_table.gather(table, ids)[0], books)
)


def summary(storage, host, device) -> list:
  """The issue's targets: measured / baseline against each, with the `section` (a TARGETS
  key) and a short `plot` label for the rows plotted."""
  rows = []
  for row in storage[1:]:
    for key, what, short in (
        ("ratio_vs_raw_bf16", "vs raw bf16 (d*2 B/token)", "bf16"),
        ("ratio_vs_lumen_store", "vs the LUMEN bf16 store", "LUMEN"),
    ):
      for suffix, books in (
          ("", "codebooks included"),
          ("_without_codebooks", "codebooks amortised"),
      ):
        plotted = (row["C"] == 256) == (suffix == "")  # C = 65,536: 134 MB of codebooks.
        rows.append(
            {
                "section": "compression",
                "ratio": row[key + suffix],
                "metric": f"{row['store']} bytes/token {what}, metadata in, {books}",
                "plot": f"C{row['C']}{'' if suffix == '' else '*'}\nvs {short}"
                if plotted
                else None,
            }
        )
  rows += [
      {
          "section": "host_reader",
          "ratio": r["ratio_vs_memmap"],
          "metric": f"host {r['codes']}, {r['reader']}, {r['ids_per_batch']} ids / memmap",
          "plot": (
              f"{r['codes'].split()[0]} {r['ids_per_batch']}\n"
              f"{'sync' if 'add_memory' in r['reader'] else 'read-ahead'}"
              if "HostMemoryReader" in r["reader"]
              else None
          ),
      }
      for r in host
      if r["reader"] != "numpy memmap [ids]"
  ]
  # The target is the dequantize's rate; gather + dequantize, the device reader's whole
  # step, is shown beside it (on 8 devices it is bound by the gather's collective).
  rows += [
      {
          "section": "dequantize" if r["what"].startswith("dequantize") else "gather",
          "ratio": r["ratio_vs_faiss"],
          "metric": f"{r['codes']} {r['what']} / faiss decode",
          "plot": (
              f"C{CODE_SETTINGS[r['codes']][1]} {r['what'].split(', ')[1][0]} dev\n"
              f"{'deq.' if r['what'].startswith('dequantize') else 'gather+deq.'}"
          ),
      }
      for r in device
      if "dequantize" in r["what"]
  ]
  for row in rows:
    row["target"] = TARGETS.get(row["section"])
    row["met"] = None if row["target"] is None else bool(row["ratio"] >= row["target"])
  return rows


def plot(rows, path: str) -> None:
  """One panel per target: the plotted rows' ratios as bars, the target as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  titles = {
      ("compression",): "bytes/token: baseline / LUMEN-VQ store\n(* codebooks amortised)",
      ("host_reader",): "host reads: HostMemoryReader / numpy memmap",
      ("dequantize", "gather"): "dequantize / FAISS decode\n(grey: gather + dequantize, "
      "not a target)",
  }
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), width_ratios=(4, 6, 6))
  for ax, (sections, title) in zip(axes, titles.items()):
    shown = [r for r in rows if r["section"] in sections and r["plot"]]
    ax.bar(
        range(len(shown)),
        [r["ratio"] for r in shown],
        color=[
            "tab:gray" if r["met"] is None else "tab:green" if r["met"] else "tab:red"
            for r in shown
        ],
    )
    ax.axhline(TARGETS[sections[0]], color="black", linestyle="--", label="target")
    ax.set_xticks(range(len(shown)), [r["plot"] for r in shown], fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.suptitle(
      f"memory store vs baselines ({os.cpu_count()} CPUs, noisy; best of repeats)", fontsize=10
  )
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)
  print(f"wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--passages", type=int, default=16384, help="passages of sections 2-4")
  parser.add_argument(
      "--demo_entities",
      type=int,
      default=2500,
      help="demo world of section 1 (~1.2 passages per entity)",
  )
  parser.add_argument(
      "--small_demo_entities", type=int, default=100, help="demo world of the C = 65,536 precompute"
  )
  parser.add_argument("--precompute_passage_length", type=int, default=64)
  parser.add_argument("--precompute_batch_size", type=int, default=128)
  parser.add_argument("--host_batches", type=int, default=50, help="batches per host timing")
  parser.add_argument(
      "--host_ids",
      type=int,
      nargs="+",
      default=[4, 16, 32, 20],
      help="pairs B K: host batches of B examples x K passages",
  )
  parser.add_argument(
      "--published_passages",
      type=int,
      default=1024,
      help="host reads of passages of the published shape (128 KB each)",
  )
  parser.add_argument("--published_batches", type=int, default=10)
  parser.add_argument(
      "--device_ids",
      type=int,
      nargs=2,
      default=(32, 20),
      metavar=("B", "K"),
      help="device batch: B examples x K passages (x 64 memory tokens)",
  )
  parser.add_argument("--repeats", type=int, default=5, help="host reads: best of")
  parser.add_argument(
      "--device_rounds",
      type=int,
      default=5,
      help="device timings: rounds of fresh inputs (report.best_of_rounds)",
  )
  parser.add_argument(
      "--device_repeats",
      type=int,
      default=20,
      help="device timings: calls of each function per round",
  )
  args = parser.parse_args()
  rng = np.random.default_rng(2)
  with tempfile.TemporaryDirectory() as tmp:
    precompute = bench_precompute(
        tmp,
        args.demo_entities,
        args.small_demo_entities,
        args.precompute_passage_length,
        args.precompute_batch_size,
    )
    report.print_table(precompute, list(precompute[0]))
    storage, stores = bench_storage(tmp, args.passages)
    report.print_table(storage, list(storage[-1]))
    store, codes, _ = stores["G32_C65536"]
    shapes = list(zip(args.host_ids[::2], args.host_ids[1::2]))
    host = bench_host(
        tmp, "Lp64 G32 uint16", store, codes, shapes, args.host_batches, args.repeats, rng
    )
    # The published shape: 128 KB a passage, where per-passage overheads weigh less.
    codes = rng.integers(0, 65536, (args.published_passages, 256, 256), dtype=np.uint16)
    store, _ = write_store(
        os.path.join(tmp, "published"),
        lambda a, b: codes[a:b],
        np.full(len(codes), 256, np.int32),
        "codes",
        np.uint16,
        256,
        np.zeros((256, 65536, 1), np.float32),
        passage_length=256,
    )
    host += bench_host(
        tmp,
        "Lp256 G256 uint16",
        store,
        codes,
        shapes[:1],
        args.published_batches,
        args.repeats,
        rng,
    )
    report.print_table(host, list(host[0]))
    ids = rng.integers(0, args.passages, args.device_ids)
    device = [
        row
        for name, (store, _, books) in stores.items()
        for row in bench_device(name, store, books, ids, args.device_rounds, args.device_repeats)
    ]
    report.print_table(device, list(device[0]))
  targets = summary(storage, host, device)
  report.print_table(targets, ["metric", "ratio", "target", "met"])
  report.write_results(
      "memory_store",
      targets,
      precompute=precompute,
      storage=storage,
      host_reader=host,
      device=device,
      settings=vars(args),
      faiss_threads=faiss.omp_get_max_threads(),
  )
  plot(targets, os.path.join(report.RESULTS_DIR, "memory_store.png"))


if __name__ == "__main__":
  main()
