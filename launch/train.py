"""Train a DP federated LoRA run; rerunning with the same --workdir resumes it.

  python -m launch.train --config configs/demo.py[:k=v,...] --workdir DIR [--config.a.b=v ...]

A workdir that holds checkpoints of this run continues from the newest one (same privacy ledger,
RNG state and noise key); one written by a different config is refused. Bad input (config, data
files, workdir) is answered with one `error:` line and exit status 2; --debug shows the traceback.
"""

import argparse
import sys

from dplora_jax import checkpoint, train, workdir
from launch import cli


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.OVERRIDE_HELP)
  p.add_argument("--config", required=True, help="config file[:args], e.g. configs/demo.py")
  p.add_argument("--workdir", required=True, help="output directory (metrics, summary, "
                                                  "checkpoints)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, overrides = cli.split_overrides(argv)
  return p.parse_args(rest), overrides


def main(argv=None) -> int:
  import logging
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  cfg = cli.load_config(args.config, overrides)
  summary = train.run(cfg, args.workdir, progress=not args.quiet).summary
  if summary["resumed_from_round"] is not None:
    print(f"resumed from the checkpoint of round {summary['resumed_from_round']}")
  print(train.format_summary(summary))
  w = args.workdir
  print(f"metrics: {w}/metrics.jsonl  summary: {w}/summary.json  tensorboard: {w}/tensorboard  "
        f"checkpoints: {w}/checkpoints")
  return 0


if __name__ == "__main__":
  cli.run(main, [checkpoint.CheckpointError, workdir.WorkdirLocked])
