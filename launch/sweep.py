"""Run the config file's sweep() grid, one workdir per point, then tables and plots.

  python -m launch.sweep --config configs/tiny.py --workdir runs/sweep_tiny
  python -m launch.sweep --config configs/finance.py --workdir runs/finance --parallel 2

Rerunning skips finished points and resumes killed ones from their checkpoints. DIR gets
points/NAME/ (each a launch.train workdir with its log.txt), results.csv, results.md,
utility_vs_eps.png, bytes_vs_rank.png and rounds.png. --list prints the points and exits;
--only task=piqa runs (and tabulates) only the points whose name has that part.

With lora.first_layer > 0, `--prefix-cache DIR` lets the points share the frozen layers'
activations (`model.prefix_cache_dir`): the first point on the same rows computes them, the
others read them. They are as sensitive as the training rows (not a DP release), so they are
never kept unless asked: choose a DIR where the data lives (not inside a directory you will share)
and delete it with the data.
"""

import argparse
import os
import sys

from dplora_jax import sweep
from launch import cli


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file with get_config() and sweep()")
  p.add_argument("--workdir", required=True, help="the sweep's directory")
  p.add_argument("--parallel", type=int, default=1, help="points run at once (processes)")
  p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                 help="run only the points whose name has this part (e.g. task=piqa); "
                      "repeatable (all must match)")
  p.add_argument("--prefix-cache", default="", metavar="DIR",
                 help="where the points keep the frozen prefix's activations (with "
                      "lora.first_layer > 0), computed by the first point on the same rows and "
                      "read by the others; as sensitive as the training data (owner-only files). "
                      "Default: never kept")
  p.add_argument("--list", action="store_true", help="print the points and exit")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.parallel < 1:
    raise ValueError(f"--parallel={args.parallel}; expected >= 1.")
  points = sweep.select(sweep.load_points(args.config), args.only)
  if args.list:
    for pt in points:
      print(pt.name, pt.overrides)
    return 0
  status = sweep.run(args.config, args.workdir, points, parallel=args.parallel,
                     echo=lambda s: print(s, flush=True),
                     prefix_cache_dir=args.prefix_cache and os.path.abspath(args.prefix_cache))
  rows = sweep.collect(args.workdir, points, title=f"sweep of {args.config}")
  print(f"{len(rows)} of {len(points)} points finished; results: {args.workdir}/results.md, "
        f"{args.workdir}/results.csv, plots: {args.workdir}/*.png")
  failed = [n for n, s in status.items() if s.startswith("failed")]
  if failed:
    print(f"error: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)
