"""Export a training workdir's newest checkpoint as a Hugging Face PEFT adapter (or merged model).

  python -m launch.export_peft --workdir runs/demo --out runs/demo/adapter
  python -m launch.export_peft --workdir runs/demo --out runs/demo/merged --merged

The adapter directory holds adapter_config.json, adapter_model.safetensors and a README.md with
the privacy report; --merged writes config.json, model.safetensors and the tokenizer instead.
"""

import argparse

from dplora_jax import checkpoint, export
from launch import cli


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.export_peft", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a launch.train workdir with checkpoints/")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--merged", action="store_true", help="write base + LoRA merged as an HF model")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  args = p.parse_args(argv)
  out = export.export_workdir(args.workdir, args.out, merged=args.merged)
  print(out)
  return 0


if __name__ == "__main__":
  cli.run(main, [checkpoint.CheckpointError])
