"""lumenvq: LUMEN / MEMORY-VQ memory-augmented readers in JAX/Flax, T5X-style."""
import setuptools

setuptools.setup(
    name="lumenvq",
    version="0.1.0",
    description="LUMEN and MEMORY-VQ (LUMEN-VQ) readers with product-quantized precomputed memory, in JAX/Flax.",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lumenvq", "lumenvq.*", "tasks", "tasks.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "seqio",
        "gin-config",
        "absl-py",
        "sentencepiece",
        "bm25s",
        "rouge-score",
        "tqdm",
        "tensorboardX",
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
        ],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
