"""lumenvq: LUMEN and MEMORY-VQ memory-augmented readers in JAX/Flax."""
