"""Privacy accounting with Google's dp-accounting (RDP by default, PLD on request).

Every guarantee of a run is the eps of a dp-accounting `DpEvent` at a delta: the composition of
the run's own releases (Poisson-sampled Gaussians, `dpsgd_event`) with any earlier releases on the
same data (`composed_event`, e.g. the run that trained a `lora.init_from` adapter).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

RDP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
              + [80, 96, 128, 256, 512, 1024])
SIGMA_MAX = 1000.0
# PLD's value discretization, relative to the eps being computed and finer for many compositions:
# the pessimistic discretization's excess grows with eps's scale and with the number of
# composed releases, so a fixed interval (1e-3) overstated eps ~ 0.13-0.3 by 4-30% over
# 3,000-20,000 steps. eps / (2000 sqrt(max(1, n / 1000))) keeps it within ~1% of tight over
# eps in [0.05, 50] (tests/dp/test_accounting.py).
PLD_RELATIVE_INTERVAL = 1.0 / 2000
PLD_INTERVAL_RANGE = (1e-6, 1e-2)
# Order grids of other libraries, to reproduce their published numbers (REFERENCE.md).
ORDER_PRESETS = {
    "default": RDP_ORDERS,
    "opacus": [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)),
    "tf_privacy": ([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                   + [128, 256, 512]),
}


@contextlib.contextmanager
def _quiet():
  """dp-accounting logs a warning for each RDP order whose series does not converge and drops
  that order; dropping orders can only raise eps (conservative), so the line is noise here."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def compositions(event) -> int:
  """The number of elementary releases composed in `event`."""
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return event.count * compositions(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return sum(compositions(e) for e in event.events)
  return 1


def pld_interval(epsilon_estimate: float, releases: int = 1) -> float:
  """The PLD value discretization for an eps of about `epsilon_estimate` over `releases`."""
  lo, hi = PLD_INTERVAL_RANGE
  if not math.isfinite(epsilon_estimate):
    return hi
  scale = PLD_RELATIVE_INTERVAL / math.sqrt(max(1.0, releases / 1000.0))
  return float(min(hi, max(lo, epsilon_estimate * scale)))


def make_accountant(kind: str = "rdp", orders: str = "default", *,
                    pld_epsilon_estimate: float = 1.0, pld_releases: int = 1):
  """A fresh dp-accounting accountant; `orders` names an RDP order grid of ORDER_PRESETS; PLD's
  discretization is chosen for an eps of about `pld_epsilon_estimate` over `pld_releases`."""
  if kind == "rdp":
    if orders not in ORDER_PRESETS:
      raise ValueError(f"RDP orders {orders!r}; expected one of {sorted(ORDER_PRESETS)}.")
    return rdp.RdpAccountant(ORDER_PRESETS[orders])
  if kind == "pld":
    return pld.PLDAccountant(
        value_discretization_interval=pld_interval(pld_epsilon_estimate, pld_releases))
  raise ValueError(f"dp.accountant={kind!r}; expected 'rdp' or 'pld'.")


def dpsgd_event(sampling_rate: float, noise_multiplier: float, steps: int):
  """`steps` compositions of the Poisson-sampled Gaussian mechanism (rate 1: no sampling)."""
  if not 0 <= sampling_rate <= 1:
    raise ValueError(f"sampling rate {sampling_rate} is outside [0, 1].")
  if steps == 0 or sampling_rate == 0:
    return dp_accounting.NoOpDpEvent()
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
  return dp_accounting.SelfComposedDpEvent(event, steps)


def truncated_dpsgd_event(dataset_size: int, sampling_rate: float, max_batch: int,
                          noise_multiplier: float, steps: int):
  """`steps` compositions of the Gaussian on a *truncated* Poisson sample (PLD only).

  Each step includes each of `dataset_size` records with probability `sampling_rate`, cuts an
  over-full sample to a uniformly random subset of `max_batch`, and adds N(0, sigma^2 C^2) to the
  clipped sum: dp-accounting's `TruncatedSubsampledGaussianDpEvent` (arXiv 2508.15089), whose
  `dataset_size` counts the protected record. When `max_batch >= dataset_size` nothing can be cut
  and this is `dpsgd_event`.
  """
  if max_batch >= dataset_size or steps == 0 or sampling_rate == 0 or noise_multiplier == 0:
    return dpsgd_event(sampling_rate, noise_multiplier, steps)
  return dp_accounting.SelfComposedDpEvent(dp_accounting.TruncatedSubsampledGaussianDpEvent(
      int(dataset_size), float(sampling_rate), int(max_batch), float(noise_multiplier)), steps)


def untruncated(event):
  """`event` with every truncated-Poisson Gaussian replaced by its untruncated counterpart.

  Only a *scale* (RDP cannot account truncation): truncation can raise eps, so this is never
  a bound on `event`; it sizes PLD's discretization and brackets calibration.
  """
  if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
    return dp_accounting.PoissonSampledDpEvent(
        event.sampling_probability, dp_accounting.GaussianDpEvent(event.noise_multiplier))
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return dp_accounting.SelfComposedDpEvent(untruncated(event.event), event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([untruncated(e) for e in event.events])
  return event


def is_truncated(event) -> bool:
  """Whether `event` holds a truncated-Poisson Gaussian (which only the PLD accountant takes)."""
  return untruncated(event) != event


def composed_event(events: Sequence):
  """The composition of `events` (NoOp parts dropped; one event is returned as is)."""
  events = [e for e in events if not isinstance(e, dp_accounting.NoOpDpEvent)]
  if not events:
    return dp_accounting.NoOpDpEvent()
  if any(isinstance(e, dp_accounting.NonPrivateDpEvent) for e in events):
    return dp_accounting.NonPrivateDpEvent()
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(list(events))


def epsilon(event, delta: float, kind: str = "rdp", orders: str = "default") -> float:
  """The eps of `event` at `delta` (PLD: discretization relative to the eps, see above).

  Build compositions with `composed_event`, which turns any non-private part into a
  NonPrivateDpEvent (eps = inf)."""
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return math.inf
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return 0.0
  with _quiet():
    if kind == "pld":
      # RDP >= the tight eps of an untruncated event: a safe scale for the discretization (for a
      # truncated one it may be below the eps, which only makes the discretization finer)
      estimate = epsilon(untruncated(event), delta, "rdp")
      acc = make_accountant("pld", pld_epsilon_estimate=estimate,
                            pld_releases=compositions(event))
    else:
      if is_truncated(event):
        raise ValueError("truncated Poisson sampling is accounted by PLD only: set "
                         "dp.accountant='pld' (or dp.truncation='delta').")
      acc = make_accountant(kind, orders)
    return float(acc.compose(event).get_epsilon(delta))


def dpsgd_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                  kind: str = "rdp", orders: str = "default") -> float:
  return epsilon(dpsgd_event(sampling_rate, noise_multiplier, steps), delta, kind, orders)


def calibrate(make_event: Callable[[float], object], target_epsilon: float, delta: float,
              kind: str = "rdp", field: str = "dp.target_epsilon", orders: str = "default",
              what: str = "") -> float:
  """The smallest sigma (to 1e-4) with epsilon(make_event(sigma)) <= target_epsilon.

  Raises:
    ValueError: no sigma <= SIGMA_MAX reaches the target (names `field`).
  """
  if epsilon(make_event(SIGMA_MAX), delta, kind, orders) > target_epsilon:
    raise ValueError(f"{field}={target_epsilon} is unreachable: even sigma={SIGMA_MAX} gives more "
                     f"{what}at delta={delta}; raise the target, or lower the rounds/steps/batch.")
  lo = 1e-3
  if kind == "pld":
    # A PLD at a tiny sigma is enormous (memory); PLD is tighter than RDP, so the RDP answer of the
    # untruncated event is an upper bracket for it (widened until it is one for a truncated event)
    # and half of it a safe lower one (widened if ever needed).
    hi = calibrate(lambda s: untruncated(make_event(s)), target_epsilon, delta, "rdp", field,
                   "default", what)
    while hi < SIGMA_MAX and epsilon(make_event(hi), delta, "pld") > target_epsilon:
      hi = min(SIGMA_MAX, 2 * hi)
    lo = hi / 2
    while lo > 1e-3 and epsilon(make_event(lo), delta, "pld") <= target_epsilon:
      lo /= 2
  else:
    hi = SIGMA_MAX
  releases = compositions(make_event(1.0))
  with _quiet():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(kind, orders, pld_epsilon_estimate=target_epsilon,
                                pld_releases=releases), make_event,
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4))


def calibrate_noise(sampling_rate: float, steps: int, target_epsilon: float, delta: float,
                    kind: str = "rdp", field: str = "dp.target_epsilon",
                    orders: str = "default") -> float:
  """The smallest sigma (to 1e-4) whose eps after `steps` sampled Gaussians is <= the target."""
  return calibrate(lambda s: dpsgd_event(sampling_rate, s, steps), target_epsilon, delta, kind,
                   field, orders, what=f"over {steps} steps at q={sampling_rate:.4g} ")
