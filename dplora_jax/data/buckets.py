"""Sequence-length buckets: each microbatch runs at the shortest of a few fixed lengths.

Examples are right-padded to `data.max_length`; a microbatch whose real tokens all lie within L
columns computes exactly the same values on [mb, L] as on [mb, T] (causal attention, positions
from the mask), so the padded columns are dropped. The lengths are fixed per run (public: from
the config), every bucket is compiled into the one round program ahead of time (`lax.switch`),
and the sample of each step is ordered longest first so that its microbatches are alike.

Which bucket a microbatch used depends on the private sample and is never released (it only
shapes compute time; see docs/benchmarks.md on timing).
"""

from __future__ import annotations

import math

import numpy as np


def bucket_lengths(max_length: int, count: int, multiple: int = 8) -> tuple[int, ...]:
  """`count` ascending lengths, multiples of `multiple` spread evenly up to `max_length`
  (which is always the last)."""
  if count <= 1:
    return (max_length,)
  out = {min(max_length, multiple * math.ceil(max_length * i / count / multiple))
         for i in range(1, count)}
  return tuple(sorted(out | {max_length}))


def order_by_length(idx: np.ndarray, valid: np.ndarray,
                    lengths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Reorders each step's sample longest first (valid rows stay first; padding last).

  Args:
    idx, valid: [slots, steps, Bmax] from the sampler.
    lengths: per real client, its examples' token counts.
  """
  idx, valid = idx.copy(), valid.copy()
  for k, n_k in enumerate(lengths):
    for s in range(idx.shape[1]):
      v = valid[k, s]
      chosen = idx[k, s, v]
      order = np.argsort(-n_k[chosen], kind="stable")
      idx[k, s, :len(chosen)] = chosen[order]
  return idx, valid


def microbatch_buckets(idx: np.ndarray, valid: np.ndarray, lengths: list[np.ndarray],
                       buckets: tuple[int, ...], microbatch: int) -> np.ndarray:
  """[slots, steps, Bmax / microbatch] int32: each microbatch's bucket index (the shortest
  length holding all its valid rows; 0 for a microbatch of padding only)."""
  slots, steps, bmax = idx.shape
  need = np.zeros((slots, steps, bmax), np.int64)
  for k, n_k in enumerate(lengths):
    need[k] = np.where(valid[k], n_k[idx[k]], 0)
  longest = need.reshape(slots, steps, bmax // microbatch, microbatch).max(-1)
  out = np.searchsorted(np.asarray(buckets), longest, side="left").astype(np.int32)
  if (out >= len(buckets)).any():
    raise ValueError(f"an example is longer than the longest bucket {buckets[-1]}.")
  return out


def length_chunks(lengths: np.ndarray, max_length: int, chunk: int):
  """Yields (row indices, width): the rows shortest first, `chunk` at a time, each at the
  shortest multiple-of-8 width (of `bucket_lengths(max_length, max_length // 8)`) holding its
  longest row; for one-off passes over a client's rows (a right-padded row computes the same
  values at its real positions at any width that holds it)."""
  widths = bucket_lengths(max_length, max(1, max_length // 8))
  order = np.argsort(lengths, kind="stable")
  for j in range(0, len(order), chunk):
    sel = order[j:j + chunk]
    yield sel, next(w for w in widths if w >= max(int(lengths[sel].max()), 1))
