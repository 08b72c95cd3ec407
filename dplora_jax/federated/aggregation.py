"""Non-private server aggregation: FedAvg's weighted sum of client updates.

The private aggregation (client updates clipped to S, server noise, the fixed divisor p K,
adaptive S) is a DP mechanism and lives in `dplora_jax.dp.mechanisms.ClientDP`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dplora_jax.dp import clipping

PyTree = Any


def weighted_sum(deltas: PyTree, weights: jax.Array) -> PyTree:
  """sum_k w_k delta_k over clients with w_k > 0 (leaves [K, ...]), exact float32.

  A zero-weight (unsampled or padding) client's delta is excluded exactly (`where`), even if it
  is non-finite.
  """
  return clipping.scaled_row_sum(deltas, weights.astype(jnp.float32))


def weighted_rows(deltas: PyTree, weights: jax.Array) -> PyTree:
  """w_k delta_k per client (leaves [K, ...]); exactly zero for a zero-weight client."""
  return clipping.scaled_rows(deltas, weights.astype(jnp.float32))


def ordered_sum(rows: PyTree) -> PyTree:
  """sum over the leading axis, added strictly in row order (a scan), so the result depends on
  the rows only, never on how they were laid out on devices."""
  def one(x):
    total, _ = jax.lax.scan(lambda acc, r: (acc + r, None), jnp.zeros(x.shape[1:], x.dtype), x)
    return total

  return jax.tree.map(one, rows)
