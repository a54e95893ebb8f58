"""The network and the readers: T5 1.1, decoding, losses, FiD / LUMEN / LUMEN-VQ / LUMEN-Light,
and the model interface the trainer drives. Imports no data code."""
