"""Host-side samplers that keep device shapes fixed.

Per local step each client draws a Poisson sample of its examples (each included independently
with probability q = expected_batch / n_k). The device program always sees `max_batch` slots: the
sample's indices followed by padding with a False mask. A sample larger than `max_batch` is cut to
a uniformly random subset of `max_batch` (an over-full sample).

Over-full samples and the privacy guarantee (conservative, stated in `truncation_delta`): the
truncated mechanism differs from the exact Poisson mechanism only on runs where some step of some
neighbouring dataset overflows. Coupling the two, a run that is (eps, delta)-DP under exact
Poisson sampling is (eps, delta + (1 + e^eps) * T * beta)-DP with truncation, where T is the
number of steps and beta = P(Binomial(n + 1, q) > max_batch) (n + 1 covers the added example).
`max_batch` is chosen so this term is a small fraction of delta and reported in the summary.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def overflow_probability(n: int, q: float, max_batch: int) -> float:
  """P(Binomial(n + 1, q) > max_batch): one step of a neighbouring dataset overflows."""
  return float(stats.binom.sf(max_batch, n + 1, q))


def truncation_delta(n: int, q: float, max_batch: int, steps: int, epsilon: float) -> float:
  """The delta charged for cutting over-full samples over `steps` steps (module docstring)."""
  if not math.isfinite(epsilon):
    return 0.0
  return (1.0 + math.exp(min(epsilon, 700.0))) * steps * overflow_probability(n, q, max_batch)


def choose_max_batch(n: int, q: float, steps: int, epsilon: float, budget: float,
                     multiple: int) -> int:
  """Smallest multiple of `multiple` whose truncation delta is <= budget (capped at n + 1)."""
  b = multiple * max(1, math.ceil(n * q / multiple))
  while b < n + 1 and truncation_delta(n, q, b, steps, epsilon) > budget:
    b += multiple
  return b


def max_batch_for_clients(sizes: list[int], expected_batch: int, steps: int, epsilon: float,
                          budget: float, multiple: int) -> int:
  """The physical batch that keeps every client's truncation delta <= budget."""
  return max(choose_max_batch(n, min(1.0, expected_batch / n), steps, epsilon, budget, multiple)
             for n in sizes)


class PoissonSampler:
  """Per-client Poisson sampling into fixed-size index/mask arrays.

  The generator must come from `dp.randomness.DPRandomness` (secret unless the user asked for a
  reproducible run): whoever can regenerate the sample can undo the amplification by sampling.
  """

  def __init__(self, client_sizes: list[int], rates: list[float], max_batch: int,
               rng: np.random.Generator | None = None, poisson: bool = True,
               fixed_batch: int = 0):
    """`rates[k]` is client k's Poisson rate (public: the plan's q); `fixed_batch` is the batch
    of non-Poisson sampling (non-private baselines and paper mode)."""
    if len(rates) != len(client_sizes):
      raise ValueError(f"{len(rates)} rates for {len(client_sizes)} clients.")
    self.sizes = list(client_sizes)
    self.rates = [float(min(1.0, r)) for r in rates]
    self.max_batch = max_batch
    self.poisson = poisson
    self.fixed_batch = fixed_batch
    self.rng = rng
    self.overflows = 0  # over-full samples seen (a private diagnostic: never in default outputs)

  def sample(self, num_steps: int, num_slots: int,
             rngs: list[np.random.Generator] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices [K_slots, steps, max_batch] int32 and mask of the same shape (bool).

    `rngs[k]` draws client k's samples (`DPRandomness.examples(k, round)`); None: `self.rng` for
    every client. Slots beyond the real clients (device padding) get all-False masks.
    """
    idx = np.zeros((num_slots, num_steps, self.max_batch), np.int32)
    valid = np.zeros((num_slots, num_steps, self.max_batch), bool)
    for k in range(len(self.sizes)):
      idx[k], valid[k] = self.sample_client(k, num_steps, self.rng if rngs is None else rngs[k])
    return idx, valid

  def sample_client(self, k: int, num_steps: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Client k's indices and mask [steps, max_batch] for one round, drawn from `rng`."""
    n = self.sizes[k]
    idx = np.zeros((num_steps, self.max_batch), np.int32)
    valid = np.zeros((num_steps, self.max_batch), bool)
    for s in range(num_steps):
      if self.poisson:
        chosen = np.flatnonzero(rng.random(n) < self.rates[k])
      else:  # fixed-size batch without replacement (non-private baselines, paper mode)
        chosen = rng.choice(n, size=min(self.fixed_batch, n), replace=False)
      if len(chosen) > self.max_batch:
        self.overflows += 1
        chosen = rng.choice(chosen, size=self.max_batch, replace=False)
      idx[s, :len(chosen)] = chosen
      valid[s, :len(chosen)] = True
    return idx, valid

  def state(self) -> dict:
    return {"overflows": self.overflows}

  def restore(self, state: dict):
    self.overflows = state["overflows"]


def sample_clients(rng: np.random.Generator, num_clients: int, rate: float) -> np.ndarray:
  """Poisson client participation [K] bool (all True when rate == 1)."""
  if rate >= 1.0:
    return np.ones((num_clients,), bool)
  return rng.random(num_clients) < rate
