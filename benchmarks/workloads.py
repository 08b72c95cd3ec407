"""The two benchmark workloads, identical for every implementation (same tokens, same loss).

- "demo": the classification fine-tune of `make demo`: a prompt, and the loss on its answer
  token only (the last position), with the LM head computed at that position alone.
- "full": a full-sequence causal-LM loss (every position's next token; head at every position).
"""

from __future__ import annotations

import numpy as np

WORKLOADS = ("demo", "full")


def batch(workload: str, vocab: int, b: int, t: int, seed: int = 0) -> dict:
  """dict of numpy arrays: tokens, mask, targets [b, t] and loss_mask [b, t] (bool)."""
  if workload not in WORKLOADS:
    raise ValueError(f"workload {workload!r}; expected one of {WORKLOADS}.")
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = np.zeros((b, t), bool)
  if workload == "demo":
    loss_mask[:, t - 2] = True  # predicts the last token (the answer) from the prompt
  else:
    loss_mask[:, :t - 1] = True
  return {"tokens": tokens, "mask": np.ones((b, t), bool), "targets": targets,
          "loss_mask": loss_mask}


def head_positions(workload: str, t: int) -> int:
  """Positions per example whose logits the loss needs."""
  return 1 if workload == "demo" else t
