"""Clipping: the one primitive every DP mechanism of dplora_jax uses to bound a contribution.

Rows (examples, or whole client updates) are clipped to an L2 bound over the whole pytree and
summed with an elementwise multiply-and-add. No `dot_general` is involved, so the sum is exact
float32 on every backend (GPU float32 dots default to TF32, which would make the clipped sum's
norm exceed the bound by up to ~1e-3 relative and void the stated sensitivity).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over every leaf of a pytree (float32, elementwise: no dot products)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_factors(norms: jax.Array, bound: jax.Array | float, keep: jax.Array) -> jax.Array:
  """The clip primitive: per-row scale min(1, bound / norm), 0 for dropped or non-finite rows.

  Args:
    norms: [N] float32 pre-clip L2 norms.
    bound: the L2 bound (C for examples, S for client updates).
    keep: [N] bool; False rows (padding, unsampled clients) get factor exactly 0.

  Formal guarantee: every row scaled by its factor has L2 norm <= bound (exactly 0 when it is
  dropped or its norm is non-finite).
  """
  ok = keep & jnp.isfinite(norms)
  return jnp.where(ok, jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-30)), 0.0)


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def scaled_rows(rows: PyTree, factors: jax.Array) -> PyTree:
  """factors[i] * rows[i] for every row (leaves [N, ...]) in float32; rows with factor <= 0 are
  exactly zero (`where`), so a non-finite row never reaches a sum of them."""
  def one(g):
    g = g.astype(jnp.float32)
    f = _rows(factors, g)
    return jnp.where(f > 0, f * g, 0.0)

  return jax.tree.map(one, rows)


def scaled_row_sum(rows: PyTree, factors: jax.Array) -> PyTree:
  """sum_i factors[i] * rows[i] (leaves [N, ...]), elementwise in float32.

  Rows with factor <= 0 are excluded with `where`, so a non-finite row never reaches the sum.
  """
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), scaled_rows(rows, factors))


class ClippedSum(NamedTuple):
  """The output of `clip_and_sum`.

  Attributes:
    sum: the clipped sum pytree (float32).
    sensitivity: its L2 sensitivity under add/remove of one row (the bound).
    norms: [N] pre-clip norms (private: never released).
    clipped: number of kept rows whose norm exceeded the bound (private).
  """
  sum: PyTree
  sensitivity: jax.Array
  norms: jax.Array
  clipped: jax.Array


def clip_and_sum(rows: PyTree, valid: jax.Array, clip_norm: jax.Array | float) -> ClippedSum:
  """Clips each row (leaves [N, ...]) to L2 norm `clip_norm` over the whole tree and sums them.

  Args:
    rows: per-example gradients, or per-client updates.
    valid: [N] bool; False rows (padding) contribute exactly zero.
    clip_norm: the bound C (> 0), a Python float or a traced scalar (adaptive clipping).

  Returns:
    A `ClippedSum`.

  Formal guarantee: for any two inputs that differ by adding or removing one valid row, the sums
  differ by at most `sensitivity` = clip_norm in L2 norm (2 * clip_norm when one row is replaced).
  A non-finite row contributes 0. The sum is exact float32 (no matmul precision involved).
  """
  norms = jax.vmap(global_norm)(rows)
  factors = clip_factors(norms, clip_norm, valid)
  n_clipped = jnp.sum((norms > clip_norm) & valid)
  return ClippedSum(scaled_row_sum(rows, factors), jnp.asarray(clip_norm, jnp.float32), norms,
                    n_clipped)


def clip_tree(tree: PyTree, clip_norm: float) -> tuple[PyTree, jax.Array]:
  """Clips one pytree as a whole to L2 norm `clip_norm`; returns (clipped, pre-clip norm).

  Formal guarantee: the result has L2 norm <= clip_norm for every input (0 if non-finite).
  """
  norm = global_norm(tree)
  factor = clip_factors(norm[None], clip_norm, jnp.ones((1,), bool))[0]
  return jax.tree.map(lambda x: jnp.where(factor > 0, factor * x.astype(jnp.float32), 0.0),
                      tree), norm


def masked_sum(rows: PyTree, valid: jax.Array):
  """Sum over valid rows, dropping rows with any non-finite entry. NOT a DP mechanism.

  Returns (sum pytree, number of valid rows dropped).
  """
  norms = jax.vmap(global_norm)(rows)
  keep = valid & jnp.isfinite(norms)
  return scaled_row_sum(rows, keep.astype(jnp.float32)), jnp.sum(valid & ~keep)
