"""Train a DP federated LoRA run.

  python -m launch.train --config configs/demo.py[:k=v,...] --workdir DIR [--config.a.b=v]
"""

from absl import app, flags
from ml_collections import config_flags

from dplora_jax import config as config_lib
from dplora_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (metrics, summary)")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config_lib.from_config_dict(_CONFIG.value)
  summary = train.run(cfg, _WORKDIR.value, progress=not _QUIET.value)
  print(train.format_summary(summary))
  print(f"metrics: {_WORKDIR.value}/metrics.jsonl  summary: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
  app.run(main)
