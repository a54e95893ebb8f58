"""Precomputed memory: the sharded code store (tensorstore zarr3), its fingerprint, shard-file
row reads (csrc/), the host reader, the device-resident table, and a run's memory feed."""
