"""Per-example clipping of gradient pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over every leaf of a pytree (float32)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def masked_sum(per_example: PyTree, valid: jax.Array):
  """Sum over valid rows of per-example values, dropping rows with any non-finite entry.

  Not a DP mechanism (no clipping). Returns (sum pytree, number of valid rows dropped).
  """
  norms = jax.vmap(global_norm)(per_example)
  keep = valid & jnp.isfinite(norms)

  def masked(g):
    g = jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g.astype(jnp.float32), 0.0)
    return jnp.sum(g, axis=0)

  return jax.tree.map(masked, per_example), jnp.sum(valid & ~keep)


def clip_and_sum(per_example: PyTree, valid: jax.Array, clip_norm: float):
  """Clips each example's gradient to L2 norm `clip_norm` over the whole tree and sums them.

  Args:
    per_example: pytree whose leaves are [B, ...] per-example gradients.
    valid: [B] bool; False rows (padding) contribute exactly zero.
    clip_norm: C > 0.

  Returns:
    (clipped_sum, sensitivity, norms, clipped_fraction_count): the sum pytree, the L2
    sensitivity C of that sum, the [B] pre-clip norms, and the number of valid rows that were
    clipped.

  Formal guarantee: for any two batches that differ by adding or removing one valid example,
  the returned sums differ by at most `sensitivity` = C in L2 norm. Non-finite gradients are
  replaced by zero before clipping, so a NaN/Inf example also contributes norm <= C (here 0).
  """
  norms = jax.vmap(global_norm)(per_example)
  finite = jnp.isfinite(norms)
  factor = jnp.where(finite & valid, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)), 0.0)

  def scaled_sum(g):
    g = jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g.astype(jnp.float32), 0.0)
    return jnp.einsum("b,b...->...", factor, g)

  clipped = jax.tree.map(scaled_sum, per_example)
  n_clipped = jnp.sum((norms > clip_norm) & valid)
  return clipped, jnp.float32(clip_norm), norms, n_clipped
