"""Run outputs: metrics.jsonl lines and the communication ledger."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dplora_jax.workdir import make_private_dir, private_open


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays in their actual dtypes."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Communication:
  """Bytes sent up (client -> server) and down (server -> client), per round and in total."""

  def __init__(self, lora_bytes: int, full_model_bytes: int, setup_down: int = 0):
    """`lora_bytes`: what travels each way per participating client per round (the trainable
    LoRA); `setup_down`: bytes sent once before round 1 (FFA's frozen A to every client)."""
    self.lora_bytes = lora_bytes
    self.full_model_bytes = full_model_bytes
    self.setup_down = setup_down
    self.up_total = 0
    self.down_total = setup_down

  def expected_round_bytes(self, expected_participants: float) -> float:
    """Bytes each way in a round with `expected_participants` (p K) clients."""
    return self.lora_bytes * expected_participants

  def record_round(self, participants: int) -> tuple[int, int]:
    up = self.lora_bytes * participants
    down = self.lora_bytes * participants  # the global LoRA goes to every sampled client
    self.up_total += up
    self.down_total += down
    return up, down


class JsonlWriter:

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path

  def write(self, record: dict):
    with private_open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def drop_after(self, last_round: int):
    """Drops lines of rounds after `last_round` (a resumed run redoes them)."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      keep = [l for l in f if l.strip() and json.loads(l)["round"] <= last_round]
    with private_open(self.path) as f:
      f.writelines(keep)

  def reset(self):
    if os.path.exists(self.path):
      os.remove(self.path)


class TensorBoardWriter:
  """The same scalars as metrics.jsonl, as TensorBoard events in WORKDIR/tensorboard."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self.logdir = os.path.join(workdir, "tensorboard")
    make_private_dir(self.logdir)  # owner-only before any event file exists
    self.writer = SummaryWriter(logdir=self.logdir)

  def write(self, record: dict):
    step = int(record["round"])
    flat = {}
    for k, v in record.items():
      if isinstance(v, dict):  # e.g. eval: {"accuracy": ...} -> eval/accuracy
        flat |= {f"{k}/{kk}": vv for kk, vv in v.items()}
      else:
        flat[k] = v
    for k, v in flat.items():
      if k != "round" and isinstance(v, (int, float)) and np.isfinite(v):
        self.writer.add_scalar(k, float(v), step)
    self.writer.flush()

  def close(self):
    self.writer.close()
