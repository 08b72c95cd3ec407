"""Runs a command and SIGKILLs it once WORKDIR/checkpoints/ROUND is committed (sweep tests).

  python -m tests.kill_run_cmd ROUND python -m launch.train ... --workdir WORKDIR ...

Exits 0 if the command finished before the checkpoint appeared (the test then fails), 1 after
killing it.
"""

import os
import signal
import subprocess
import sys
import time


def main():
  round_, cmd = sys.argv[1], sys.argv[2:]
  workdir = cmd[cmd.index("--workdir") + 1]
  target = os.path.join(workdir, "checkpoints", round_)
  p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 170
  while p.poll() is None and time.time() < deadline:
    if os.path.isdir(target):
      os.kill(p.pid, signal.SIGKILL)
      p.wait()
      return 1
    time.sleep(0.01)
  if p.poll() is None:
    p.kill()
    p.wait()
  return 0


if __name__ == "__main__":
  sys.exit(main())
