"""Train a DP federated LoRA run; rerunning with the same --workdir resumes it.

  python -m launch.train --config configs/demo.py[:k=v,...] --workdir DIR [--config.a.b=v ...]

A workdir that holds checkpoints of this run continues from the newest one (same privacy ledger,
RNG state and noise key); one written by a different config is refused. Bad input (config, data
files, workdir) is answered with one `error:` line and exit status 2; --debug shows the traceback.

Many processes (hosts), one run: start the same command in every process with
--coordinator HOST:PORT --num_processes N --process_id I (or the DPLORA_COORDINATOR,
DPLORA_NUM_PROCESSES, DPLORA_PROCESS_ID variables that launch/local_multiprocess.sh sets), or
--cluster auto on a TPU pod / SLURM / Open MPI allocation. The workdir must be shared.
"""

import argparse
import sys

from dplora_jax import checkpoint, distributed, train, workdir
from launch import cli

# What a run's workdir can refuse (written by another config, held by a live run, a replica that
# diverged): bad input like a bad config, answered with one line by every command that trains.
ERRORS = (checkpoint.CheckpointError, workdir.WorkdirLocked, distributed.ReplicaMismatch)


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.OVERRIDE_HELP)
  p.add_argument("--config", required=True, help="config file[:args], e.g. configs/demo.py")
  p.add_argument("--workdir", required=True, help="output directory (metrics, summary, "
                                                  "checkpoints)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--coordinator", help="multi-process run: HOST:PORT of process 0")
  p.add_argument("--num_processes", type=int, help="multi-process run: number of processes")
  p.add_argument("--process_id", type=int, help="multi-process run: this process (0..N-1)")
  p.add_argument("--cluster", choices=["auto"],
                 help="multi-process run on a TPU pod / SLURM / Open MPI: JAX detects it")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, overrides = cli.split_overrides(argv)
  return p.parse_args(rest), overrides


def start_runtime(args):
  """JAX's distributed runtime from the flags, else the environment; nothing for one process."""
  flags = (args.coordinator, args.num_processes, args.process_id)
  if args.cluster:
    distributed.initialize(auto=True)
  elif any(f is not None for f in flags):
    if any(f is None for f in flags):
      raise ValueError("--coordinator, --num_processes and --process_id go together.")
    distributed.initialize(*flags)
  else:
    distributed.initialize_from_env()


def main(argv=None) -> int:
  import logging
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  start_runtime(args)
  cfg = cli.load_config(args.config, overrides)
  summary = train.run(cfg, args.workdir, progress=not args.quiet).summary
  if not distributed.is_main():  # process 0 reports for the run
    return 0
  if summary["resumed_from_round"] is not None:
    print(f"resumed from the checkpoint of round {summary['resumed_from_round']}")
  print(train.format_summary(summary))
  w = args.workdir
  print(f"metrics: {w}/metrics.jsonl  summary: {w}/summary.json  tensorboard: {w}/tensorboard  "
        f"checkpoints: {w}/checkpoints")
  return 0


if __name__ == "__main__":
  cli.run(main, ERRORS)
