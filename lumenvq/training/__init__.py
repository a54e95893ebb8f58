"""Running jobs: trainer, checkpoints, optimizers, partitioning, input pipeline, evaluation,
summaries, gin CLI plumbing, parameter I/O and checkpoint import."""
