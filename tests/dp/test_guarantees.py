"""Each printed guarantee holds as the mechanism runs: secret sampling, released outputs only,
public sizes, exact clipped sums, and the accountant's event rebuilt from what the sampler did."""

import dataclasses
import json
import os

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import tiny as tiny_config
from dplora_jax import build, config as config_lib, train
from dplora_jax.data import classification as data_lib
from dplora_jax.dp import clipping, release
from dplora_jax.dp.mechanisms import AdaptiveClip, ClientDP, PaperGroups
from dplora_jax.federated import aggregation, client as client_lib
from dplora_jax.host_state import HostState
from dplora_jax.metrics import Communication
from tests import tiny


def _cfg(arg=""):
  return config_lib.from_config_dict(tiny_config.get_config(arg or None))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("release"))
  return wd, train.run(_cfg("rounds=2"), wd, progress=False)


# -- bug 3: unnoised statistics of private data never leave by default -----------------------

def test_default_outputs_hold_only_released_values(run_dir):
  wd, res = run_dir
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  allowed = set(release.PUBLIC_KEYS) | {"epsilon_example"}
  for line in lines:
    assert set(line) <= allowed, set(line) - allowed
  summary = json.load(open(os.path.join(wd, "summary.json")))

  def keys(d):
    if isinstance(d, dict):
      for k, v in d.items():
        yield k
        yield from keys(v)
    elif isinstance(d, list):
      for v in d:
        yield from keys(v)

  private = {"client_sizes", "poisson_overflows", "loss", "clip_fraction", "signal_norm",
             "noise_norm", "noise_to_signal", "seconds", "diagnostics", "smallest_client"}
  assert not set(keys(summary)) & private
  assert summary["private_diagnostics"] is False
  assert "NON-PRIVATE" not in train.format_summary(summary)


def test_round_step_returns_no_private_statistic_or_noise_unless_asked():
  step, state, args, _ = tiny.round_setup(num_clients=4)
  _, metrics = step(state, **args)
  assert set(metrics["public"]) == {"participants", "lora_finite"}
  assert metrics["diagnostics"] == {}
  spec = ClientDP(1.0, 4.0, AdaptiveClip(0.5, 0.2, 1.0, 4.0))
  step, state, args, _ = tiny.round_setup(num_clients=4, mechanism="none", client_dp=spec,
                                          client_clip=0.1, diagnostics=True)
  _, metrics = step(state, **args)
  # S and the fraction are post-processing of the noised count; the server noise is never out
  assert set(metrics["public"]) == {"participants", "lora_finite", "client_clip_norm",
                                    "unclipped_fraction"}
  assert not any("noise" in k for k in list(metrics["public"]) + list(metrics["diagnostics"]))
  assert set(metrics["diagnostics"]) >= {"loss", "clip_fraction", "signal_norm", "examples"}


def test_diagnostics_are_prefixed_and_flagged():
  rec = release.round_record("sample", 1, {"example": 1.0}, {"participants": 3}, 10, 10, 0, 0,
                             {"loss": 2.0})
  assert rec["private_loss"] == 2.0 and "loss" not in rec
  rec = release.round_record("client", 1, {"client": 1.0}, {"participants": 3}, 10, 10, 7.5,
                             7.5)
  assert "participants" not in rec and rec["expected_bytes_up"] == 7.5


# -- bug 2: sampling randomness is secret ----------------------------------------------------

def test_sampling_cannot_be_regenerated_from_the_config():
  """The old sampler was np.random.default_rng(seed + 1) and clients default_rng(seed + 2): an
  adversary holding summary.json could replay them. Now two runs of the same config draw
  different samples, none equal to that replay; only dp.reproducible_seed makes them repeat."""
  cfg = _cfg("client_rate=0.5")
  s = build.build(cfg)
  host = lambda c: HostState.create(c, s, Communication(1, 1))
  h1, h2 = host(cfg), host(cfg)
  p1, i1, v1 = h1.sample_round(cfg, 4, 0)
  p2, i2, v2 = h2.sample_round(cfg, 4, 0)
  assert not np.array_equal(v1, v2)
  replay = np.random.default_rng(cfg.seed + 1)
  old = [replay.random(len(c)) < cfg.data.batch_size / len(c) for c in s.clients]
  assert not all(np.array_equal(np.sort(i1[k, 0][v1[k, 0]]), np.flatnonzero(old[k]))
                 for k in range(len(old)))
  seeded = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, reproducible_seed=11))
  h3, h4 = host(seeded), host(seeded)
  for a, b in zip(h3.sample_round(seeded, 4, 0), h4.sample_round(seeded, 4, 0)):
    np.testing.assert_array_equal(a, b)
  assert "not secret" in h3.randomness.source and h1.randomness.source == "os-entropy"


# -- overclaim 4: the plan, rates, divisor and physical batch use public values only ---------

@pytest.mark.parametrize("mode", ["sample", "sample+client"])
def test_one_more_example_changes_no_released_parameter(mode):
  cfg = _cfg(f"mode={mode},examples=396,max_client=100,client_eps=8")  # clients of 99
  base = build.build(cfg)
  tok = base.tokenizer
  one = data_lib.build_examples([{"text": "an added example", "label": 1}], tok,
                                labels=cfg.data.labels, prompt=cfg.data.prompt,
                                max_length=cfg.data.max_length, source="extra")
  empty = one.subset(np.arange(0))
  grown = build.build(cfg, extra_train=[one, empty, empty, empty])
  assert [len(c) for c in grown.clients] != [len(c) for c in base.clients]
  assert grown.plan.to_dict() == base.plan.to_dict()  # sigma, q, eps, delta, divisor, S
  assert (grown.max_batch, grown.rates) == (base.max_batch, base.rates)
  assert base.rates == [cfg.data.batch_size / cfg.data.max_client_size] * 4
  assert base.plan.dpsgd.divisor == cfg.data.batch_size
  # a client over the public bound is refused before training
  with pytest.raises(ValueError, match="data.max_client_size=100 is below the size of 1 client"):
    build.build(cfg, extra_train=[data_lib.concat([one] * 2), empty, empty, empty])


def test_summary_states_the_public_bound_and_no_sizes(run_dir):
  _, res = run_dir
  s = res.summary
  assert s["max_client_size"] == 100 and s["assumed_public"]["max_client_size"] == 100
  assert "client_sizes" not in s
  assert "bound of 100 examples per client" in train.format_summary(s)


# -- overclaim 8: clipped sums are exact float32 on every backend (no dot_general) -----------

def _primitives(fn, *args):
  return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).eqns} | {
      e.primitive.name for eq in jax.make_jaxpr(fn)(*args).eqns
      for sub in jax.core.jaxprs_in_params(eq.params) for e in sub.eqns}


def test_clipping_and_aggregation_use_no_matmul():
  rows = {"a": jnp.ones((4, 3, 2)), "b": jnp.ones((4, 5))}
  valid = jnp.array([True, True, False, True])
  assert "dot_general" not in _primitives(lambda r, v: clipping.clip_and_sum(r, v, 1.0), rows,
                                          valid)
  assert "dot_general" not in _primitives(lambda r, w: aggregation.weighted_sum(r, w), rows,
                                          jnp.ones(4))
  spec = ClientDP(1.0, 4.0, AdaptiveClip(0.5, 0.2, 1.0, 4.0))
  assert "dot_general" not in _primitives(lambda r, v: spec.clip(r, v, jnp.float32(1.0)), rows,
                                          valid)
  graphdef, lora, frozen = tiny.model_and_lora()
  paper = PaperGroups(0.1, 0.01)
  assert "dot_general" not in _primitives(lambda g: paper.release(jax.random.key(0), g)[0],
                                          lora)


def test_clipped_sum_norm_is_at_most_c_at_full_float32():
  rng = np.random.default_rng(0)
  rows = {"w": jnp.asarray(rng.normal(size=(64, 257)) * 1e3, jnp.float32)}
  for i in range(64):
    one = {"w": rows["w"][i:i + 1]}
    s = clipping.clip_and_sum(one, jnp.ones(1, bool), 0.37).sum
    assert float(clipping.global_norm(s)) <= 0.37 * (1 + 1e-6)


# -- accounting hygiene: the sampler's behaviour rebuilds the accountant's event -------------

def test_event_rebuilt_from_the_sampler_equals_the_planned_event():
  """The bug class users of DP libraries hit most: sampler and accountant drifting apart. Run
  the real host sampler over a whole run, then rebuild each mechanism's DpEvent from what it
  did (rates used, releases made per client, the noise the compiled step uses)."""
  cfg = _cfg("mode=sample+client,client_rate=0.5,rounds=6,client_eps=8")
  s = build.build(cfg)
  host = HostState.create(cfg, s, Communication(1, 1))
  spec = client_lib.ClientSpec.from_plan(s.plan, cfg)
  k, steps = cfg.fed.num_clients, cfg.fed.local_steps
  included, offered, releases, participated = 0, 0, np.zeros(k, int), []
  for r in range(cfg.fed.rounds):
    part, idx, valid = host.sample_round(cfg, k, r)
    participated.append(part)
    for c in range(k):
      n = len(s.clients[c])
      # every client runs every local step, sampled or not: each step is a release of its data
      releases[c] += steps
      included += int(valid[c].sum())
      offered += n * steps
  # the realised per-example inclusion rate is the rate the sampler was given ...
  rates = set(host.sampler.rates)
  assert len(rates) == 1
  q = rates.pop()
  assert stats.binomtest(included, offered, q).pvalue > 1e-4
  assert host.sampler.overflows == 0
  # ... and the event rebuilt from it is exactly what the plan accounted
  rebuilt = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(spec.dpsgd.noise_multiplier)), int(releases.max()))
  assert (releases == releases.max()).all()
  assert s.plan.get("example").event(cfg.fed.rounds) == rebuilt
  # client level: one release per round at the realised participation rate p
  part = np.asarray(participated)
  assert stats.binomtest(int(part.sum()), part.size, cfg.fed.client_rate).pvalue > 1e-4
  server = s.plan.server
  m = (server.sum_noise ** -2 + (2 * server.adaptive.count_noise) ** -2) ** -0.5 \
      if server.adaptive else server.sum_noise
  rebuilt = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      cfg.fed.client_rate, dp_accounting.GaussianDpEvent(m)), cfg.fed.rounds)
  assert s.plan.get("client").event(cfg.fed.rounds) == rebuilt
