"""A run's working directory: owner-only, and held by one run at a time.

A workdir holds what strips the noise (the DP-noise root, sampler states, intermediate LoRA in
the checkpoints), so it is as secret as the data: it is created 0700 and its files 0600. A run
holds it with a lock file naming the holder's pid and host; a second writer is refused, and a
stale lock left by a dead process on this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import stat

LOCK = ".dplora.lock"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def make_private_dir(path: str):
  """Creates `path` (and parents) and makes it owner-only (0700)."""
  os.makedirs(path, exist_ok=True)
  os.chmod(path, 0o700)


def private_open(path: str, mode: str = "w"):
  """open() for a file the run writes: created 0600, and made 0600 if it already exists (text,
  or bytes with a "b" mode)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC),
               0o600)
  os.fchmod(fd, 0o600)
  return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def restrict_tree(path: str):
  """chmod every directory under `path` 0700 and every file 0600 (after orbax writes)."""
  for root, dirs, files in os.walk(path):
    os.chmod(root, 0o700)
    for f in files:
      p = os.path.join(root, f)
      if not os.path.islink(p):
        os.chmod(p, 0o600)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Exclusive hold of a workdir for the lifetime of a run (context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.held = False

  def acquire(self):
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR)
      except FileExistsError:
        holder = self._holder()
        if holder is None:  # unreadable or half-written: treat as stale only if old
          continue
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
          self._take_over(holder)
          continue
        raise WorkdirLocked(
            f"workdir {os.path.dirname(self.path)!r} is held by another run (pid "
            f"{holder.get('pid')} on {holder.get('host')}); wait for it to finish, or use "
            f"another --workdir (if that process is gone on another host, delete {self.path}).")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirLocked(f"could not take the lock {self.path}; delete it if no run is using the "
                        "workdir.")

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _take_over(self, holder: dict):
    """Removes a dead process's lock, only if it is still that lock (no race with a newer one)."""
    if self._holder() == holder:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def release(self):
    if self.held:
      if (self._holder() or {}).get("pid") == os.getpid():
        os.remove(self.path)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
