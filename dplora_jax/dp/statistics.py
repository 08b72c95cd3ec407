"""Statistics of private rows, released only through the Gaussian mechanism.

A model's hidden states share a large common component (on SmolLM2-135M's residual stream ~97%
of each row's squared norm, docs/results.md 4o): a gradient that multiplies them spends most of
its clip budget on that shared direction. Centring needs the mean of private rows, so the mean is
released like any other statistic: noised, with its event composed into the run's accounting.
"""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp

from dplora_jax.dp import noise


def unit_rows(x: jax.Array) -> jax.Array:
  """Every row of x [N, D] scaled to L2 norm 1 (a per-row map: no statistic of other rows)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def private_mean(key: jax.Array, x: jax.Array, noise_multiplier: float) -> jax.Array:
  """The Gaussian-mechanism release of the mean of the unit-normed rows of x [N, D].

  Each row is scaled to norm 1, so adding or removing one row moves the sum by at most 1 (L2);
  the sum is released with N(0, noise_multiplier^2 I) and divided by N, which is treated as
  public (the dataset size; a run's Poisson sampler already uses it).

  Formal guarantee: the Gaussian mechanism with sensitivity 1 and noise multiplier sigma under
  add/remove-one-row adjacency: `mean_event(sigma)`, to be composed with the run's other events.
  """
  if noise_multiplier <= 0:
    raise ValueError(f"noise_multiplier={noise_multiplier}; the private mean needs sigma > 0.")
  rows = unit_rows(x)
  total = noise.gaussian_release(key, rows.sum(0), 1.0, noise_multiplier)
  return total / rows.shape[0]


def mean_event(noise_multiplier: float):
  """The dp-accounting event of one `private_mean` release."""
  return dp_accounting.GaussianDpEvent(noise_multiplier)
