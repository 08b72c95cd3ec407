"""Every privatising mechanism of a run, as static specs (built by `dp.plan`) and pure functions.

- `DPSGD`: per-example DP-SGD release of one client step (the per-example clip-and-sum is
  `clipping.clip_and_sum`, accumulated over microbatches by the client).
- `PaperGroups`: the DP-LoRA paper's Algorithm 1 release (each LoRA factor group of the batch-mean
  gradient clipped to C and noised).
- `CentralDPSGD`: the same per-example DP-SGD with the noise added once, by a trusted aggregator,
  to the sum of every participating client's clipped gradient sum (`dp.noise_at='server'`).
- `ClientDP`: DP-FedAvg at the server: client updates clipped to S (`clip`), summed, noised and
  divided by the fixed expected number of clients (`release`).
- `AdaptiveClip`: Andrew et al. (2021) adaptive S, an init/update pair with a NamedTuple state;
  its count release is noised and accounted with the update sum (`dp.plan`).

All noise comes from keys derived from the run's secret DP-noise key; nothing here returns the
noise that was drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dplora_jax import lora as lora_lib
from dplora_jax.dp import clipping, noise

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DPSGD:
  """Per-example DP-SGD on one client step.

  Attributes:
    clip_norm: C, the per-example L2 bound over the whole LoRA tree.
    noise_multiplier: sigma.
    divisor: B, the public expected batch (never the realised sample size).
  """
  clip_norm: float
  noise_multiplier: float
  divisor: float

  def release(self, key: jax.Array, clipped_sum: PyTree) -> PyTree:
    """(clipped sum + N(0, (sigma C)^2)) / B.

    Args:
      clipped_sum: a sum of per-example gradients each clipped to `clip_norm` by
        `clipping.clip_and_sum` (over any number of microbatches: its sensitivity is C).

    Formal guarantee: the Gaussian mechanism with L2 sensitivity C (add/remove of one example of
    this client's Poisson sample) and noise multiplier sigma; dividing by the public B is
    post-processing. With Poisson sampling at rate q this is the sampled Gaussian that
    `dp.accounting` composes.
    """
    noised = noise.gaussian_release(key, clipped_sum, self.clip_norm, self.noise_multiplier)
    return jax.tree.map(lambda x: x / self.divisor, noised)


@dataclasses.dataclass(frozen=True)
class CentralDPSGD:
  """Per-example DP-SGD noised by a trusted aggregator (`dp.noise_at='server'`).

  Each participating client computes one step's clipped per-example gradient sum (`clipping.
  clip_and_sum`, no noise) and hands it to the aggregator, which sums them and releases the sum
  once with N(0, (sigma C)^2): the federated batch is one DP-SGD batch, with sqrt(participants)
  less noise on the average than every client noising its own sum at the same eps. The
  aggregator sees each client's clipped, un-noised sum: it must be trusted (or the sum taken under
  secure aggregation, which this codebase does not implement); everyone else sees only the
  release. Needs one local plain-SGD step per round (the client update is then linear in its sum).

  Attributes:
    dpsgd: the example-level spec (C, sigma, the public expected batch B of each client).
    client_lr: the clients' SGD learning rate (their step is applied to the released average).
  """
  dpsgd: DPSGD
  client_lr: float

  def release(self, key: jax.Array, clipped_sum: PyTree, participants: jax.Array) -> PyTree:
    """The average client update: -lr (sum + N(0, (sigma C)^2)) / (B participants).

    Args:
      key: the aggregator's noise key for this round (used here only).
      clipped_sum: sum over the participating clients of their clipped per-example gradient
        sums, each example of each client clipped to C and counted once (client weights 0 or 1).
      participants: the number of sampled clients (the aggregator's own sampling decision,
        fixed before any client replies; not a function of the clients' data).

    Formal guarantee: every example belongs to one client, so adding or removing one example
    moves `clipped_sum` by at most C: `DPSGD.release` on it is the Gaussian mechanism with
    multiplier sigma (the other clients' sums are independent of that example); with each
    client's Poisson sample at rate q it is the sampled Gaussian `dp.plan` accounts (truncation
    as for the client-noised mechanism). The divisions and the sign are post-processing.
    """
    released = self.dpsgd.release(key, clipped_sum)  # (sum + noise) / B
    denom = jnp.maximum(participants, 1.0)
    return jax.tree.map(lambda x: -self.client_lr * x / denom, released)


@dataclasses.dataclass(frozen=True)
class PaperGroups:
  """The paper's Algorithm 1 release.

  Attributes:
    clip_norm: C, the bound of each factor group (all A leaves; all B leaves).
    noise_std: the absolute noise std per coordinate (sigma C, or sigma C / B).
  """
  clip_norm: float
  noise_std: float

  def release(self, key: jax.Array, grad: PyTree) -> tuple[PyTree, dict]:
    """Each LoRA factor group of `grad` clipped to C as a whole, plus N(0, noise_std^2).

    Groups use independent keys: fold_in(key, 0) for A, fold_in(key, 1) for B.

    Returns:
      (noised gradient, {"a"/"b": pre-clip group norm} (private; diagnostics only)).

    Formal guarantee: each group's clipped value has norm <= C for ANY batch, so replacing any
    part of the client's data moves it by at most 2C: each group release is a Gaussian mechanism
    with multiplier noise_std / (2C) under replace-one of the client's data (see `dp.plan`).
    """
    leaves, treedef = jax.tree.flatten(grad)
    names = jax.tree.leaves(lora_lib.factor_of(grad))
    out, norms = list(leaves), {}
    for gi, name in enumerate(("a", "b")):
      ids = [i for i, n in enumerate(names) if n == name]
      if not ids:  # FFA: no A group
        continue
      clipped, norms[name] = clipping.clip_tree([leaves[i] for i in ids], self.clip_norm)
      noised = noise.gaussian_release(jax.random.fold_in(key, gi), clipped, 1.0, self.noise_std)
      for i, x in zip(ids, noised):
        out[i] = x
    return jax.tree.unflatten(treedef, out), norms


class AdaptiveClipState(NamedTuple):
  """State of adaptive clipping: the current client-level bound S (float32 scalar)."""
  clip_norm: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
  """Adaptive client clipping (Andrew et al. 2021): S moves geometrically towards the
  `quantile` of client update norms, driven by a noised count.

  Attributes:
    quantile: gamma, the target fraction of unclipped clients.
    lr: eta; S <- S * exp(-eta * (noised unclipped fraction - gamma)).
    count_noise: sigma_b, the std of the noise on the shifted count (sensitivity 1/2).
    expected_clients: p K, the public divisor of the count.
  """
  quantile: float
  lr: float
  count_noise: float
  expected_clients: float

  def init(self, initial_clip: float) -> AdaptiveClipState:
    return AdaptiveClipState(jnp.float32(initial_clip))

  @staticmethod
  def shifted_count(norms: jax.Array, take: jax.Array, clip_norm: jax.Array) -> jax.Array:
    """sum over participating clients of (b_i - 1/2), b_i = [norm_i <= S] (a non-finite update
    counts as clipped). Summable across devices."""
    b = (jnp.isfinite(norms) & (norms <= clip_norm)).astype(jnp.float32)
    return jnp.sum(jnp.where(take, b - 0.5, 0.0))

  def update(self, state: AdaptiveClipState, key: jax.Array, shifted_count: jax.Array):
    """Releases the noised count and steps S.

    Returns:
      (new state, the released noised unclipped fraction).

    Formal guarantee: adding or removing one client changes `shifted_count` by exactly 1/2, so
    the release sum(b_i - 1/2) + N(0, sigma_b^2) is a Gaussian mechanism with multiplier
    2 sigma_b. Adding 1/2 after dividing by p K, and the new S, are post-processing.
    """
    noised = shifted_count + self.count_noise * jax.random.normal(key, (), jnp.float32)
    frac = noised / self.expected_clients + 0.5
    new = state.clip_norm * jnp.exp(-self.lr * (frac - self.quantile))
    return AdaptiveClipState(new.astype(jnp.float32)), frac


@dataclasses.dataclass(frozen=True)
class ClientDP:
  """DP-FedAvg at the server (McMahan et al. 2018), optionally with adaptive S.

  Attributes:
    sum_noise: sigma_delta; the clipped update sum gets noise std sigma_delta * S.
    expected_clients: p K, the public fixed divisor.
    adaptive: the adaptive-clipping spec, or None for a fixed S.
  """
  sum_noise: float
  expected_clients: float
  adaptive: AdaptiveClip | None = None

  def clip(self, deltas: PyTree, take: jax.Array, clip_norm: jax.Array):
    """Clips each participating client's update (leaves [K, ...]) to S and sums.

    Returns:
      (clipped sum, shifted unclipped count (0 without adaptive clipping), [K] norms).

    Formal guarantee: adding or removing one client's whole dataset changes the sum by at most S
    and the shifted count by exactly 1/2 (see `clipping.clip_and_sum`, `AdaptiveClip`).
    """
    clipped = clipping.clip_and_sum(deltas, take, clip_norm)
    count = (AdaptiveClip.shifted_count(clipped.norms, take, clip_norm) if self.adaptive
             else jnp.float32(0))
    return clipped.sum, count, clipped.norms

  def clip_rows(self, deltas: PyTree, take: jax.Array, clip_norm: jax.Array):
    """`clip` without the sum: (each client's clipped update [K, ...], zero unless it takes
    part; shifted count; norms). Their sum is `clip`'s sum up to float summation order (the
    round's ordered aggregation sums them in client order)."""
    norms = jax.vmap(clipping.global_norm)(deltas)
    rows = clipping.scaled_rows(deltas, clipping.clip_factors(norms, clip_norm, take))
    count = (AdaptiveClip.shifted_count(norms, take, clip_norm) if self.adaptive
             else jnp.float32(0))
    return rows, count, norms

  def release(self, key: jax.Array, clipped_sum: PyTree, shifted_count: jax.Array,
              clip_norm: jax.Array):
    """The server's release: (sum + N(0, (sigma_delta S)^2)) / (p K), and the next S.

    Args:
      key: the server's noise key for this round (used here only).
      clipped_sum, shifted_count: the psummed outputs of `clip`.
      clip_norm: the S used by `clip` this round.

    Returns:
      (average update, next S, released stats: S, and the noised unclipped fraction when
      adaptive).

    Formal guarantee: the sum release is a Gaussian mechanism with multiplier sigma_delta
    (sensitivity S); with adaptive clipping the count release has multiplier 2 sigma_b and the
    pair is exactly as private as one Gaussian with multiplier
    (sigma_delta^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm 1), which `dp.plan`
    accounts. The divisor p K is fixed; the next S is post-processing of the noised count.
    """
    noised = noise.gaussian_release(jax.random.fold_in(key, 0), clipped_sum, clip_norm,
                                    self.sum_noise)
    avg = jax.tree.map(lambda x: x / self.expected_clients, noised)
    stats = {"client_clip_norm": clip_norm}
    new_clip = clip_norm
    if self.adaptive:
      state, frac = self.adaptive.update(AdaptiveClipState(clip_norm), jax.random.fold_in(key, 1),
                                         shifted_count)
      new_clip = state.clip_norm
      stats["unclipped_fraction"] = frac
    return avg, new_clip, stats
