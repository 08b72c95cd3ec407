"""Runs a training job and SIGKILLs its own process at a chosen point (for the resume tests).

  python -m tests.kill_run WORKDIR CONFIG_ARG ROUND PHASE

PHASE: "before_save" (round ROUND computed and logged, its checkpoint not yet written),
"during_save" (orbax wrote round ROUND's temporary checkpoint but had not committed it), or
"after_save" (round ROUND's checkpoint committed).
"""

import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

from configs import tiny
from dplora_jax import checkpoint, config as config_lib, train


def main():
  workdir, arg, kill_round, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
  die = lambda: os.kill(os.getpid(), signal.SIGKILL)
  real_save = checkpoint.Checkpointer.save
  current = {}

  def save(self, round_, *a, **kw):
    current["round"] = round_
    if round_ == kill_round and phase == "before_save":
      die()
    real_save(self, round_, *a, **kw)
    if round_ == kill_round and phase == "after_save":
      die()

  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *a, **kw):
    if current.get("round") == kill_round and phase == "during_save":
      die()
    return await real_finalize(self, *a, **kw)

  checkpoint.Checkpointer.save = save
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  train.run(config_lib.from_config_dict(tiny.get_config(arg)), workdir, progress=False)


if __name__ == "__main__":
  main()
