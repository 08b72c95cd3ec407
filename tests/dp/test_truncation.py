"""Truncated Poisson sampling accounted in the PLD event (dp.truncation='accounted').

Expected values come from dp-accounting directly (its TruncatedSubsampledGaussianDpEvent and
PoissonSampledDpEvent through a PLDAccountant), never from the plan under test.
"""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from dplora_jax.config import DataConfig, DPConfig, FedConfig, OptimConfig, RunConfig
from dplora_jax.dp import accounting, plan as plan_lib, sampling
from dplora_jax.dp.ledger import Ledger

DELTA = 1e-5
INTERVAL = 2e-3  # eps 8 / 4000: twice as fine as the plan's own (eps / 2000), so the tighter value


def _pld_eps(event, delta=DELTA, interval=INTERVAL):
  acc = pld.PLDAccountant(value_discretization_interval=interval)
  return acc.compose(event).get_epsilon(delta)


def _truncated(n, q, bmax, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, bmax, sigma), steps)


def _poisson(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _cfg(n_pub=500, batch=16, rounds=6, local_steps=1, mb=8, **dp):
  dp = dict(dict(accountant="pld", target_epsilon=8.0, delta=DELTA), **dp)
  return RunConfig(data=DataConfig(batch_size=batch, max_client_size=n_pub), dp=DPConfig(**dp),
                   fed=FedConfig(num_clients=3, rounds=rounds, local_steps=local_steps),
                   optim=OptimConfig(microbatch_size=mb))


@pytest.fixture(scope="module")
def demo_plan():
  """A demo-sized shape (the demo before session 21): max_client_size 500, expected batch 16, 6
  steps, eps 8 at delta 1e-5."""
  return plan_lib.make_plan(_cfg())


def test_the_event_is_built_from_the_samplers_parameters(demo_plan):
  m = demo_plan.get("example")
  steps = m.rounds * m.releases_per_round
  assert m.details["truncation"] == "accounted" and m.extra_delta == 0.0
  assert m.max_batch == demo_plan.max_batch  # the sampler's physical batch is the accounted one
  assert m.dataset_size == 500 + 1  # a client at the public bound plus the added example
  assert m.sampling_rate == pytest.approx(16 / 500)
  # the event the ledger reports is exactly dp-accounting's truncated event with those values
  want = _truncated(501, 16 / 500, m.max_batch, m.noise_multiplier, steps)
  assert m.event(m.rounds) == want
  # and its eps, recomputed here at a finer discretization, is the reported one (to 1%)
  eps = _pld_eps(want)
  assert eps <= m.epsilon <= 1.01 * eps
  assert 0.99 * 8.0 <= m.epsilon <= 8.0
  assert m.delta == DELTA  # nothing charged outside the accountant


def test_max_batch_is_the_smallest_multiple_within_the_slack(demo_plan):
  m = demo_plan.get("example")
  b = m.max_batch
  sigma0 = accounting.calibrate_noise(16 / 500, 6, 8.0, DELTA, "pld")  # untruncated calibration
  untruncated = _pld_eps(_poisson(16 / 500, sigma0, 6))
  assert b % 8 == 0 and 16 <= b
  assert _pld_eps(_truncated(501, 16 / 500, b, sigma0, 6)) <= 1.01 * untruncated * 1.005
  assert _pld_eps(_truncated(501, 16 / 500, b - 8, sigma0, 6)) > 1.01 * untruncated
  # far smaller than the batch that charging truncation to delta needs at the same (eps, delta)
  delta_plan = plan_lib.make_plan(_cfg(truncation="delta"))
  assert b < delta_plan.max_batch
  # the price: sigma calibrated for the truncated event, a little above the untruncated one
  assert sigma0 <= m.noise_multiplier <= 1.05 * sigma0


@pytest.mark.parametrize("n,q,bmax,sigma,steps", [
    (1001, 0.01, 60, 1.0, 50),  # expected 10, P(> 60) ~ 1e-23
    (2001, 0.008, 64, 0.7, 200),
])
def test_truncation_that_never_binds_agrees_with_untruncated_pld(n, q, bmax, sigma, steps):
  assert bmax < n  # a real truncated event, not the shortcut to the plain one
  truncated = accounting.truncated_dpsgd_event(n, q, bmax, sigma, steps)
  assert truncated == _truncated(n, q, bmax, sigma, steps)
  want = _pld_eps(_poisson(q, sigma, steps))
  assert accounting.epsilon(truncated, DELTA, "pld") == pytest.approx(want, rel=0.01)


def test_plan_with_a_large_max_batch_agrees_with_the_untruncated_plan():
  big = plan_lib.make_plan(_cfg(truncation="accounted", max_batch_size=120)).get("example")
  assert big.max_batch == 120 and big.dataset_size == 501
  sigma = accounting.calibrate_noise(16 / 500, 6, 8.0, DELTA, "pld")
  assert big.noise_multiplier == pytest.approx(sigma, rel=0.01)


@pytest.mark.parametrize("q,bmax,sigma,steps", [(16 / 500, 32, 0.45, 6), (0.02, 12, 0.8, 40)])
def test_epsilon_grows_with_the_dataset_size(q, bmax, sigma, steps):
  """The assumption that lets one event at max_client_size + 1 cover every smaller client
  (dp/plan.py states it): more records at the same rate, more cutting, no less eps."""
  sizes = [bmax + 1, 2 * bmax, 400, 450, 501]
  eps = [_pld_eps(_truncated(n, q, bmax, sigma, steps), interval=5e-3) for n in sizes]
  assert all(b >= a - 1e-6 for a, b in zip(eps, eps[1:])), eps
  assert eps[-1] > eps[0]  # and truncation does cost something here


def test_sampler_cuts_over_full_samples_to_a_uniform_subset_of_max_batch():
  """What the event assumes of the sampler: each record in with prob q, an over-full sample cut
  to a uniformly random subset of exactly max_batch."""
  rng = np.random.default_rng(0)
  n, q, bmax = 40, 0.5, 16
  s = sampling.PoissonSampler([n], [q], bmax, rng)
  idx, valid = s.sample(4000, 1)
  sizes = valid[0].sum(-1)
  assert sizes.max() == bmax and s.overflows > 0
  counts = np.zeros(n)
  for i, v in zip(idx[0], valid[0]):
    counts[i[v]] += 1
  # by symmetry every record is equally likely to survive the cut
  assert counts.std() / counts.mean() < 0.05


def test_rdp_cannot_account_truncation_and_says_so():
  with pytest.raises(ValueError, match="dp.truncation='accounted' needs dp.accountant='pld'"):
    plan_lib.make_plan(_cfg(accountant="rdp", truncation="accounted"))
  with pytest.raises(ValueError, match="accounted by PLD only"):
    accounting.epsilon(_truncated(101, 0.1, 12, 1.0, 3), DELTA, "rdp")
  # auto follows the accountant
  assert plan_lib.make_plan(_cfg(accountant="rdp")).get("example").details["truncation"] == "delta"


def test_ledger_round_trip_keeps_the_truncated_event(demo_plan):
  ledger = demo_plan.ledger(6)
  back = Ledger.from_dict(ledger.to_dict())
  assert back.get("example").event() == ledger.get("example").event()
  assert back.epsilons() == pytest.approx(ledger.epsilons())
  # a version-1 ledger (no truncated segments) is still read
  d = plan_lib.make_plan(_cfg(accountant="rdp")).ledger(6).to_dict()
  d["ledger_version"] = 1
  for s in d["entries"][0]["segments"]:
    del s["dataset_size"], s["max_batch"]
  assert math.isfinite(Ledger.from_dict(d).get("example").epsilon)
