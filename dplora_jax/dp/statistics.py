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

from dplora_jax.dp import clipping, noise


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


# One example's contribution to a released mean is the vector [COUNT v, COUNT] of L2 norm <= 1,
# with its scaled rows v clipped to norm 1 and the constant count coordinate: the numerator and
# the count are released by one Gaussian of sensitivity 1, and their ratio is the mean (nothing of
# the private data, not even the number of examples, is used un-noised).
COUNT = 2 ** -0.5


def clipped_rows(blocks: dict[str, jax.Array], bounds: dict,
                 valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """COUNT * each example's blocks {name: [n, F]} divided by their public `bounds` (a number or
  an [F] array per block) and, concatenated over the blocks, clipped to L2 norm 1 by the clip
  primitive (`clipping.clip_factors`; rows where `valid` is False become exactly 0): a
  per-example map whose rows have norm <= COUNT."""
  scaled = {k: jnp.asarray(v, jnp.float32) / jnp.asarray(bounds[k], jnp.float32)
            for k, v in blocks.items()}
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(v), axis=1) for v in scaled.values()))
  keep = jnp.ones(norms.shape, bool) if valid is None else jnp.asarray(valid, bool)
  factor = COUNT * clipping.clip_factors(norms, 1.0, keep)
  return {k: v * factor[:, None] for k, v in scaled.items()}


def mean_sums(blocks: dict[str, jax.Array], bounds: dict,
              valid: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
  """(sum of `clipped_rows` per block, COUNT * number of valid examples): one party's un-noised
  contribution to `release_mean_sums`; rows where `valid` is False contribute exactly zero."""
  rows = clipped_rows(blocks, bounds, valid)
  n = next(iter(rows.values())).shape[0]
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  return {k: v.sum(0) for k, v in rows.items()}, COUNT * valid.sum().astype(jnp.float32)


def release_mean_sums(key: jax.Array, sums: dict[str, jax.Array], count: jax.Array,
                      noise_multiplier: float):
  """The Gaussian mechanism on (sums, count): every coordinate gets N(0, sigma^2) (sensitivity 1
  under add/remove of one example: its contribution has norm <= 1). sigma 0 returns them exact
  (a non-private run's clipped mean)."""
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier={noise_multiplier}; expected >= 0.")
  return noise.gaussian_release(key, (sums, jnp.asarray(count, jnp.float32)), 1.0,
                                noise_multiplier)


def mean_from_sums(sums: dict[str, jax.Array], count: jax.Array, bounds: dict,
                   min_count: float = 1.0) -> dict[str, jax.Array]:
  """The mean in the rows' units, bounds * sums / count (COUNT cancels): post-processing of
  released sums (the released count is floored at `min_count` examples)."""
  n = jnp.maximum(jnp.asarray(count, jnp.float32), COUNT * min_count)
  return {k: v * jnp.asarray(bounds[k], jnp.float32) / n for k, v in sums.items()}
