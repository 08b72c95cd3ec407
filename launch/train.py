"""Train a DP federated LoRA run; rerunning with the same --workdir resumes it.

  python -m launch.train --config configs/demo.py[:k=v,...] --workdir DIR [--config.a.b=v]

A workdir that holds checkpoints of this run continues from the newest one (same privacy ledger,
RNG state and noise key); one written by a different config is refused.
"""

import sys


from absl import app, flags, logging
from ml_collections import config_flags

from dplora_jax import checkpoint, config as config_lib, train, workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (metrics, summary)")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")
_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of an error")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    cfg = config_lib.from_config_dict(_CONFIG.value)
    summary = train.run(cfg, _WORKDIR.value, progress=not _QUIET.value).summary
  except (checkpoint.CheckpointError, PermissionError, workdir.WorkdirLocked, ValueError,
          FileNotFoundError) as e:
    if _DEBUG.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  if summary["resumed_from_round"] is not None:
    print(f"resumed from the checkpoint of round {summary['resumed_from_round']}")
  print(train.format_summary(summary))
  print(f"metrics: {_WORKDIR.value}/metrics.jsonl  summary: {_WORKDIR.value}/summary.json  "
        f"tensorboard: {_WORKDIR.value}/tensorboard  checkpoints: {_WORKDIR.value}/checkpoints")
  return 0


if __name__ == "__main__":
  app.run(main)
