"""Running jobs: trainer, checkpoints, optimizers, partitioning, input pipeline, evaluation,
summaries, gin CLI plumbing and parameter I/O."""
