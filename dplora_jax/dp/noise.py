"""The Gaussian mechanism on pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: jax.Array) -> PyTree:
  """Independent N(0, std^2) for every coordinate of `tree` (one fresh subkey per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, jnp.float32)
                                      for k, x in zip(keys, leaves)])


def add_gaussian_noise(key: jax.Array, clipped_sum: PyTree, sensitivity: jax.Array,
                       noise_multiplier: float) -> tuple[PyTree, PyTree]:
  """Releases clipped_sum + N(0, (noise_multiplier * sensitivity)^2 I).

  Args:
    key: used for this release only (derive it with fold_in per client, round and step).
    clipped_sum: the output of `clip_and_sum`, untouched.
    sensitivity: the L2 sensitivity that `clip_and_sum` returned.
    noise_multiplier: sigma.

  Returns:
    (noised sum, the noise that was added).

  Formal guarantee: with an L2 sensitivity of `sensitivity` under add/remove-one adjacency, this
  is the Gaussian mechanism with noise multiplier sigma; composed and subsampled as described by
  `dplora_jax.dp.accounting`, it yields the run's (eps, delta).
  """
  noise = gaussian_noise_like(key, clipped_sum, noise_multiplier * sensitivity)
  return jax.tree.map(jnp.add, clipped_sum, noise), noise
