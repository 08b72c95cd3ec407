"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023).

  python -m launch.audit --config configs/tiny.py:mode=none --workdir runs/audit_none

Trains the config once with --canaries canary examples (each included with probability 1/2),
then writes DIR/audit.json: epsilon_lower_bound (at --confidence), epsilon_claimed, canaries,
confidence, and the guess counts. The last line printed is the lower bound.
"""

import argparse
import sys
import json

from dplora_jax import audit, config_files
from launch import cli
from launch import train as train_cli


def parse(argv):
  p = argparse.ArgumentParser(epilog=cli.OVERRIDE_HELP, prog="python -m launch.audit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file[:args], e.g. configs/tiny.py")
  p.add_argument("--workdir", required=True, help="where the run and audit.json go")
  p.add_argument("--canaries", type=int, default=200, help="m (default %(default)s)")
  p.add_argument("--confidence", type=float, default=0.95)
  p.add_argument("--guess-fraction", type=float, default=0.25,
                 help="k+ = k- = this fraction of m (default %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="canary draw seed")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, args_overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  args = p.parse_args(rest)
  args.overrides = args_overrides
  if args.canaries < 2:
    p.error(f"--canaries={args.canaries} must be >= 2.")
  if not 0 < args.confidence < 1:
    p.error(f"--confidence={args.confidence} must be in (0, 1).")
  if not 0 < args.guess_fraction <= 0.5:
    p.error(f"--guess-fraction={args.guess_fraction} must be in (0, 0.5].")
  return args


def main(argv=None) -> int:
  args = parse(argv)
  cfg = config_files.load_with_overrides(args.config, args.overrides)
  out = audit.run_audit(cfg, args.workdir, canaries=args.canaries, confidence=args.confidence,
                        guess_fraction=args.guess_fraction, seed=args.seed,
                        progress=not args.quiet)
  print(json.dumps(out, indent=2, default=float))
  print(f"{out['epsilon_lower_bound']:.6g}")
  return 0


if __name__ == "__main__":
  cli.run(main, train_cli.ERRORS)
