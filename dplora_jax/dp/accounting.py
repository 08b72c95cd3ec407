"""Privacy accounting with Google's dp-accounting (RDP by default, PLD on request).

The protected unit of `dp.mode = "sample"` is one example of one client (add/remove adjacency).
Each local step of a client is a Poisson-sampled Gaussian mechanism with rate q_k = B / n_k and
noise multiplier sigma; a client may take part in every round, so its examples are charged for
rounds * local_steps compositions whether or not it was sampled (client sampling is not credited:
conservative). The run's guarantee is that of the client with the largest q (the smallest client).
The truncation of over-full Poisson samples is charged to delta (see `dp.sampling`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

from dplora_jax.dp import sampling

RDP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
              + [80, 96, 128, 256, 512, 1024])
SIGMA_MAX = 1000.0
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


def make_accountant(kind: str = "rdp", orders: str = "default"):
  """A fresh dp-accounting accountant; `orders` names an RDP order grid of ORDER_PRESETS."""
  if kind == "rdp":
    if orders not in ORDER_PRESETS:
      raise ValueError(f"RDP orders {orders!r}; expected one of {sorted(ORDER_PRESETS)}.")
    return rdp.RdpAccountant(ORDER_PRESETS[orders])
  if kind == "pld":
    return pld.PLDAccountant(value_discretization_interval=1e-3)
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


def epsilon(event, delta: float, kind: str = "rdp", orders: str = "default") -> float:
  """The eps of `event` at `delta`."""
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return math.inf
  with _quiet():
    return float(make_accountant(kind, orders).compose(event).get_epsilon(delta))


def dpsgd_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                  kind: str = "rdp", orders: str = "default") -> float:
  return epsilon(dpsgd_event(sampling_rate, noise_multiplier, steps), delta, kind, orders)


def calibrate_noise(sampling_rate: float, steps: int, target_epsilon: float, delta: float,
                    kind: str = "rdp", field: str = "dp.target_epsilon",
                    orders: str = "default") -> float:
  """The smallest sigma (to 1e-4) whose eps after `steps` is <= target_epsilon.

  Raises:
    ValueError: no sigma <= SIGMA_MAX reaches the target (names `field`).
  """
  if dpsgd_epsilon(sampling_rate, SIGMA_MAX, steps, delta, kind, orders) > target_epsilon:
    raise ValueError(f"{field}={target_epsilon} is unreachable: even sigma={SIGMA_MAX} gives more "
                     f"over {steps} steps at q={sampling_rate:.4g}, delta={delta}; raise the "
                     "target, or lower the rounds/steps/batch.")
  lo = 1e-3
  if kind == "pld":
    # A PLD at a tiny sigma is enormous (memory); PLD is tighter than RDP, so the RDP answer is an
    # upper bracket and half of it a safe lower one (widened if ever needed).
    hi = calibrate_noise(sampling_rate, steps, target_epsilon, delta, "rdp", field, "default")
    lo = hi / 2
    while lo > 1e-3 and dpsgd_epsilon(sampling_rate, lo, steps, delta, "pld") <= target_epsilon:
      lo /= 2
  else:
    hi = SIGMA_MAX
  with _quiet():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(kind, orders), lambda s: dpsgd_event(sampling_rate, s, steps),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4))


@dataclasses.dataclass(frozen=True)
class SamplePlan:
  """The privacy plan of `dp.mode = "sample"`, fixed before training.

  Attributes:
    sampling_rate: q of the smallest client (the largest rate: the run's worst case).
    steps: rounds * local_steps, the compositions each example is charged for.
    noise_multiplier: sigma.
    delta: the total delta reported (accountant delta + truncation delta).
    accountant_delta: the delta handed to the accountant.
    truncation_delta: the delta charged for cutting over-full samples.
    max_batch: the physical Poisson batch (slots per step).
    accountant: "rdp" or "pld".
    epsilon: eps after all steps.
  """
  sampling_rate: float
  steps: int
  steps_per_round: int
  noise_multiplier: float
  delta: float
  accountant_delta: float
  truncation_delta: float
  max_batch: int
  accountant: str
  epsilon: float
  smallest_client: int

  def epsilon_after(self, rounds_done: int) -> float:
    return dpsgd_epsilon(self.sampling_rate, self.noise_multiplier,
                         rounds_done * self.steps_per_round, self.accountant_delta,
                         self.accountant)


def plan_sample_dp(dp, client_sizes: list[int], expected_batch: int, rounds: int,
                   local_steps: int, microbatch: int) -> SamplePlan:
  """Calibrates (or checks) sigma and sizes the Poisson batch for per-example DP-SGD.

  Raises:
    ValueError: delta >= 1/n for the smallest client (unless dp.allow_large_delta), a batch
      larger than a client's data, or an unreachable target.
  """
  n_min = min(client_sizes)
  if expected_batch > n_min:
    raise ValueError(f"data.batch_size={expected_batch} exceeds the smallest client's "
                     f"{n_min} examples.")
  if dp.delta >= 1.0 / n_min and not dp.allow_large_delta:
    raise ValueError(f"dp.delta={dp.delta} >= 1/{n_min} (the smallest client's size): such a "
                     "delta allows releasing an example outright; lower it or set "
                     "dp.allow_large_delta=True.")
  q = expected_batch / n_min
  steps = rounds * local_steps
  acc_delta = dp.delta * (1.0 - dp.truncation_delta_fraction)
  trunc_budget = dp.delta * dp.truncation_delta_fraction
  if dp.noise_multiplier > 0:
    sigma = float(dp.noise_multiplier)
  else:
    sigma = calibrate_noise(q, steps, dp.target_epsilon, acc_delta, dp.accountant)
  eps = dpsgd_epsilon(q, sigma, steps, acc_delta, dp.accountant)
  if dp.max_batch_size:
    max_batch = int(math.ceil(dp.max_batch_size / microbatch) * microbatch)
  else:
    max_batch = sampling.max_batch_for_clients(client_sizes, expected_batch, steps, eps,
                                               trunc_budget, microbatch)
  trunc = max(sampling.truncation_delta(n, expected_batch / n, max_batch, steps, eps)
              for n in client_sizes)
  if trunc > trunc_budget:
    raise ValueError(f"dp.max_batch_size={dp.max_batch_size} is too small: cutting over-full "
                     f"Poisson samples would cost delta {trunc:.3g} > {trunc_budget:.3g}; raise it "
                     "or set 0 (automatic).")
  return SamplePlan(sampling_rate=q, steps=steps, steps_per_round=local_steps,
                    noise_multiplier=sigma, delta=acc_delta + trunc, accountant_delta=acc_delta,
                    truncation_delta=trunc, max_batch=max_batch, accountant=dp.accountant,
                    epsilon=eps, smallest_client=n_min)
