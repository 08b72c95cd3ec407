"""The workdir of a run: one writer at a time (a dead holder's lock is taken over), a full disk
keeps the previous checkpoint, an unwritable path is a clear error, and the run restricts only
its own files. (Split from test_checkpoint.py: these need no shared reference run, so they can
run beside it.)"""

import errno
import json
import os
import socket
import stat
import subprocess

import orbax.checkpoint as ocp
import pytest

from configs import tiny
from dplora_jax import checkpoint, config as config_lib, train, workdir

ARG = "rounds=4,dp_seed=5,client_rate=0.75,server_opt=fedadam"


def _cfg(arg=ARG):
  return config_lib.from_config_dict(tiny.get_config(arg))


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  holder = subprocess.Popen(["sleep", "60"])
  try:
    lock = os.path.join(wd, workdir.LOCK)
    json.dump({"pid": holder.pid, "host": socket.gethostname()}, open(lock, "w"))
    with pytest.raises(workdir.WorkdirLocked, match=f"held by another run \\(pid {holder.pid}"):
      train.run(_cfg("rounds=1"), wd, progress=False)
    assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  finally:
    holder.kill()
    holder.wait(timeout=10)
  out = train.run(_cfg("rounds=1"), wd, progress=False)  # the holder is dead: stale lock taken
  assert out.host.rounds_done == 1 and not os.path.exists(lock)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path)
  real = ocp.CheckpointManager.save

  def full(self, step, *a, **kw):
    if step == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(checkpoint.CheckpointError, match=r"round 3 .* failed: .*No space left.* "
                     r"newest intact checkpoint is round 2"):
    train.run(_cfg(), wd, progress=False)
  monkeypatch.setattr(ocp.CheckpointManager, "save", real)
  out = train.run(_cfg(), wd, progress=False).summary  # resumes from round 2
  assert out["resumed_from_round"] == 2


def test_workdir_that_is_not_writable_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="is not writable"):
    train.run(_cfg(), str(blocker / "run"), progress=False)


def test_only_the_runs_own_files_are_made_owner_only(tmp_path):
  """The run restricts what it writes (checkpoints, logs, summary), never the user's files that
  happen to sit in the workdir."""
  wd = tmp_path / "run"
  wd.mkdir()
  mine = wd / "notes.txt"
  mine.write_text("the user's")
  os.chmod(mine, 0o644)
  train.run(_cfg("rounds=1,ckpt_every=0"), str(wd), progress=False)
  assert stat.S_IMODE(os.stat(mine).st_mode) == 0o644
  assert stat.S_IMODE(os.stat(wd / "tensorboard").st_mode) == 0o700
  for f in ("metrics.jsonl", "summary.json"):
    assert stat.S_IMODE(os.stat(wd / f).st_mode) == 0o600
