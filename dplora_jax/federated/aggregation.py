"""Server-side aggregation of client updates.

Two rules, both sums that the round psums across devices:
- `weighted_sum`: FedAvg, sum_k w_k delta_k (divided by sum_k w_k at the server).
- `clip_updates` + `privatize_sum`: DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping
  (Andrew et al. 2021): each client's update is clipped to S, the server adds N(0, (sigma S)^2) to
  the sum and divides by the fixed expected number of clients p K.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dplora_jax.dp import clipping, noise

PyTree = Any


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def weighted_sum(deltas: PyTree, weights: jax.Array) -> PyTree:
  """sum_k w_k delta_k over clients with w_k > 0 (leaves [K, ...]).

  where(), not multiplication: a zero-weight (unsampled or padding) client's delta is excluded
  exactly, even if it is non-finite.
  """
  w = weights.astype(jnp.float32)
  take = w > 0
  return jax.tree.map(lambda d: jnp.einsum("k,k...->...", w, jnp.where(_rows(take, d), d, 0.0)),
                      deltas)


def clip_updates(deltas: PyTree, take: jax.Array, clip_norm: jax.Array):
  """Clips each participating client's update to L2 norm S and sums them.

  Args:
    deltas: leaves [K, ...], one update per client slot.
    take: [K] bool, participating clients (False: unsampled or padding, contributes 0).
    clip_norm: S (a traced scalar: adaptive clipping changes it between rounds).

  Returns:
    (clipped sum pytree, number of participating clients whose norm was <= S, [K] norms).

  Formal guarantee: adding or removing one client's whole dataset changes the sum by at most S in
  L2 norm and the unclipped count by at most 1. A non-finite update is replaced by zero (it is
  counted as clipped).
  """
  norms = jax.vmap(clipping.global_norm)(deltas)
  finite = jnp.isfinite(norms)
  factor = jnp.where(take & finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)), 0.0)
  summed = jax.tree.map(
      lambda d: jnp.einsum("k,k...->...", factor, jnp.where(_rows(finite, d), d, 0.0)), deltas)
  unclipped = jnp.sum((take & finite & (norms <= clip_norm)).astype(jnp.float32))
  return summed, unclipped, norms


@dataclasses.dataclass(frozen=True)
class ClientDP:
  """Static description of the server's client-level mechanism (from `dp.plan.PrivacyPlan`).

  Attributes:
    sum_noise: sigma_delta, multiplier of the noise on the clipped sum (std sigma_delta * S).
    expected_clients: p K, the fixed divisor of the noised sum.
    adaptive: update S towards the `quantile` of client update norms.
    count_noise: sigma_b, std of the noise on the unclipped count (adaptive only).
    quantile: gamma, the target fraction of unclipped clients.
    clip_lr: eta, the geometric step size of S.
  """
  sum_noise: float
  expected_clients: float
  adaptive: bool = False
  count_noise: float = 0.0
  quantile: float = 0.5
  clip_lr: float = 0.2


def privatize_sum(key: jax.Array, clipped_sum: PyTree, unclipped: jax.Array,
                  clip_norm: jax.Array, spec: ClientDP):
  """The server's release: (sum + N(0, (sigma_delta S)^2)) / (p K), and the next S.

  Args:
    key: the server's noise key for this round (used here only).
    clipped_sum, unclipped: the psummed outputs of `clip_updates`.
    clip_norm: the S used by `clip_updates` this round.

  Returns:
    (average update pytree, next S, stats dict with the noise norm and the noised unclipped
    fraction).

  Formal guarantee: with sensitivity S (the sum) and 1 (the count), the sum release is a Gaussian
  mechanism with multiplier sigma_delta and the count release one with multiplier sigma_b; for
  adaptive clipping the pair is as private as one Gaussian with multiplier
  (sigma_delta^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm 1), which is what `dp.plan`
  accounts. The divisor p K is fixed, and the next S depends only on the noised count
  (post-processing).
  """
  k_sum, k_count = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  noise_tree = noise.gaussian_noise_like(k_sum, clipped_sum, spec.sum_noise * clip_norm)
  avg = jax.tree.map(lambda x, z: (x + z) / spec.expected_clients, clipped_sum, noise_tree)
  stats = {"server_noise_norm": clipping.global_norm(noise_tree) / spec.expected_clients,
           "client_clip_norm": clip_norm}
  new_clip = clip_norm
  if spec.adaptive:
    b = (unclipped + spec.count_noise * jax.random.normal(k_count, (), jnp.float32))
    frac = b / spec.expected_clients
    new_clip = clip_norm * jnp.exp(-spec.clip_lr * (frac - spec.quantile))
    stats["unclipped_fraction"] = frac
  return avg, new_clip, stats
