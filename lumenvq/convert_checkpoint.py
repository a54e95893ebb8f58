r"""Import T5 1.1 checkpoints from Hugging Face or T5X into an orbax parameter checkpoint.

  python -m lumenvq.convert_checkpoint --from hf  SRC_DIR --to DST_DIR
  python -m lumenvq.convert_checkpoint --from t5x SRC_DIR --to DST_DIR

hf:  a `transformers` T5 1.1 directory: `config.json` plus `model.safetensors`
     (or sharded `model-*.safetensors`, or `pytorch_model.bin`, which needs torch).
     The network's dimensions are read from config.json.
t5x: a T5X checkpoint directory (`checkpoint_N/`): the msgpack file `checkpoint`
     whose `optimizer/target` holds the parameters, each either inline or a
     reference to a tensorstore array beside it. Dimensions come from
     `--gin_file` model configs (T5X checkpoints carry no config).

DST gets the orbax checkpoint `DST/params` and `DST/model.gin`, the T5Config
bindings to use with it. Any missing, unexpected or mis-shaped parameter stops
the conversion with an error that names it.
"""

import argparse
import os
import sys

import gin

from lumenvq.model.network_config import T5Config
from lumenvq.training.checkpoint_import import convert


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m lumenvq.convert_checkpoint",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
      "--from",
      dest="source",
      required=True,
      choices=["hf", "t5x"],
      help="hf: Hugging Face T5 1.1 directory (config.json + "
      "safetensors or pytorch_model.bin); t5x: T5X checkpoint_N directory",
  )
  parser.add_argument("src", help="source directory")
  parser.add_argument("--to", dest="dst", required=True, help="output directory")
  parser.add_argument(
      "--gin_file",
      action="append",
      default=[],
      help="t5x only: model size gin file(s), e.g. gin_configs/models/base.gin",
  )
  parser.add_argument(
      "--gin",
      dest="gin_bindings",
      action="append",
      default=[],
      help="t5x only: extra gin bindings, e.g. 'T5Config.vocab_size=32128'",
  )
  args = parser.parse_args(argv)
  try:
    t5x_config = None
    if args.source == "t5x" and (args.gin_file or args.gin_bindings):
      gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings)
      t5x_config = T5Config()
    config = convert(args.source, args.src, args.dst, t5x_config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.join(args.dst, 'params')} and model.gin: {config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
