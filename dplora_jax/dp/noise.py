"""The Gaussian mechanism on pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: jax.Array | float) -> PyTree:
  """Independent N(0, std^2) for every coordinate of `tree` (one fresh subkey per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, jnp.float32)
                                      for k, x in zip(keys, leaves)])


def gaussian_release(key: jax.Array, value: PyTree, sensitivity: jax.Array | float,
                     noise_multiplier: float) -> PyTree:
  """Releases value + N(0, (noise_multiplier * sensitivity)^2 I). The noise is not returned.

  Args:
    key: used for this release only (derive it with fold_in per client, round and step).
    value: a clipped sum (or clipped tree), untouched since clipping.
    sensitivity: the L2 sensitivity the clipping returned.
    noise_multiplier: sigma.

  Formal guarantee: with L2 sensitivity `sensitivity` under the neighbouring relation of the
  caller, this is the Gaussian mechanism with noise multiplier sigma (RDP
  alpha / (2 sigma^2)); subsampling and composition are accounted in `dp.accounting`.
  """
  z = gaussian_noise_like(key, value, noise_multiplier * sensitivity)
  return jax.tree.map(lambda x, n: x.astype(jnp.float32) + n, value, z)
