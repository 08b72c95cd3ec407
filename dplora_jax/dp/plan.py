"""The privacy plan of a run: every mechanism in it, the unit it protects, and its accounting.

`make_plan` is the one place where sigma, C, q and the unit of each mechanism are decided; the
same object builds the compiled mechanisms (`dpsgd`, `paper`, `server`: `dp.mechanisms` specs)
and the accountant's events (`Mechanism.event`), so the two cannot drift apart. Only public
values enter: the config (including the public client-size bound `data.max_client_size`) and the
ledger of a starting adapter; never the data or the realised client sizes.

- "example" (dp.mode sample / sample+client): DP-SGD on each client. Unit: one example of one
  client, add/remove. Each local step is a Poisson-sampled Gaussian with the public rate
  q = data.batch_size / data.max_client_size (the same q for every client, so no client's sigma
  depends on another's size); the divisor is the public B and the physical batch is sized for a
  client of the public bound, so a neighbouring dataset (n_k +/- 1) changes none of them.
  Over-full samples are cut to a random `max_batch` subset and paid for by `dp.truncation`:
  "accounted" (PLD): the event is dp-accounting's truncated-Poisson Gaussian on
  max_client_size + 1 records (the neighbour that adds an example to a client at the bound), and
  max_batch is the smallest multiple of the microbatch whose eps is within `dp.truncation_slack`
  of the untruncated eps; sigma is then calibrated for that truncated event. Its eps grows with
  the dataset size (more records, more cutting), so the bound covers every smaller client: checked
  numerically (tests/dp/test_truncation.py), not proven here. "delta" (any accountant): the
  coupling bound of `dp.sampling.truncation_delta` is charged to delta, which needs a max_batch
  far in the tail (3.5x the expected batch on the demo).
  With dp.noise_at='server' the same Gaussian is applied once per round by a trusted aggregator
  to the sum of the clients' clipped sums (`CentralDPSGD`): an example lies in one client, the
  other clients' sums do not depend on it, so the event (q, sigma, truncation) is the same one.
  A centred LoRA (`lora.centre`) releases the mean input of each adapted layer once before round
  1: one Gaussian of sensitivity 1 per example (`federated.centre`), composed into this unit's
  guarantee as a segment of its own ("lora centre"); sigma of the steps is calibrated around it.
- "client" (dp.mode client / sample+client): DP-FedAvg (McMahan et al. 2018). Unit: one whole
  client (add/remove of its dataset). Each round is a Poisson-sampled (rate p) Gaussian on the sum
  of client updates clipped to S; client sampling is credited. With adaptive clipping (Andrew et
  al. 2021) the shifted count sum(b_i - 1/2) (sensitivity 1/2) gets noise std sigma_b, i.e.
  multiplier 2 sigma_b, and the update sum multiplier sigma_delta =
  (sigma^-2 - (2 sigma_b)^-2)^-1/2: together exactly one Gaussian with multiplier sigma (their
  Theorem 1), which is what is accounted.
- "paper" (dp.mode paper): Algorithm 1 of the DP-LoRA paper, reported twice:
  * the paper's claim: sigma = sqrt(2 ln(1.25/delta)) / eps is the classical Gaussian mechanism
    for ONE release of sensitivity 1, valid only for eps < 1 (Dwork and Roth, Thm A.1);
  * the honest guarantee of what is released. Each round every client releases, per LoRA factor
    group (A and B; B only under FFA), clip_C(mean gradient) + N(0, s^2) with s = sigma C (or
    sigma C / B). The clipped group gradient has norm <= C for ANY batch, so replacing one example,
    or even the whole batch, moves it by at most 2C: per-group sensitivity 2C, multiplier
    s / 2C. No amplification is claimed, so each client composes groups x rounds Gaussian
    releases. The unit is one client's whole data under replace-one adjacency.
"""

from __future__ import annotations

import dataclasses
import math

from dplora_jax.dp import accounting, sampling
from dplora_jax.dp.ledger import Ledger, LedgerEntry, Segment, segments_event
from dplora_jax.dp.mechanisms import DPSGD, AdaptiveClip, CentralDPSGD, ClientDP, PaperGroups

UNITS = {
    "example": "one example of one client (add/remove)",
    "client": "one whole client's dataset (add/remove)",
    "paper": "one client's whole data (replace-one; covers any single example in it)",
}


def paper_sigma(epsilon: float, delta: float) -> float:
  """The paper's noise multiplier: sqrt(2 ln(1.25 / delta)) / eps (classical Gaussian bound)."""
  return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def paper_epsilon(sigma: float, delta: float) -> float:
  """The per-iteration eps the paper claims for noise multiplier sigma (inverse of paper_sigma)."""
  return math.sqrt(2.0 * math.log(1.25 / delta)) / sigma


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """One privacy mechanism of a run and its guarantee (the accountant's view).

  Attributes:
    name: "example", "client" or "paper".
    unit: the protected unit, in words.
    sampling_rate: Poisson rate credited by the accountant (1 = no amplification).
    releases_per_round: Gaussian releases charged per round to the unit.
    rounds: planned rounds.
    noise_multiplier: the accounted multiplier (noise std / L2 sensitivity).
    delta: the total delta reported (accountant delta + truncation + earlier runs' charges).
    accountant_delta: the delta handed to the accountant.
    accountant: "rdp" or "pld".
    epsilon: eps after all planned rounds (earlier runs included).
    extra_delta: this run's delta charged outside the accountant (truncation).
    dataset_size, max_batch: with max_batch > 0 the releases are accounted as truncated-Poisson
      samples of `dataset_size` records cut to `max_batch` (PLD).
    prior: segments of earlier runs on the same data (a starting adapter's ledger).
    details: mechanism-specific facts for the report (all JSON-serialisable).
  """
  name: str
  unit: str
  sampling_rate: float
  releases_per_round: int
  rounds: int
  noise_multiplier: float
  delta: float
  accountant_delta: float
  accountant: str
  epsilon: float
  extra_delta: float = 0.0
  dataset_size: int = 0
  max_batch: int = 0
  prior: tuple[Segment, ...] = ()
  details: dict = dataclasses.field(default_factory=dict)

  def entry(self, rounds_done: int) -> LedgerEntry:
    """The ledger entry after `rounds_done` rounds of this run."""
    own = Segment(self.sampling_rate, self.noise_multiplier,
                  rounds_done * self.releases_per_round, self.extra_delta,
                  dataset_size=self.dataset_size, max_batch=self.max_batch)
    return LedgerEntry(self.name, self.unit, self.accountant, self.accountant_delta,
                       self.prior + (own,))

  def event(self, rounds_done: int):
    """The dp-accounting DpEvent of everything released after `rounds_done` rounds."""
    return self.entry(rounds_done).event()

  def epsilon_after(self, rounds_done: int) -> float:
    return self.entry(rounds_done).epsilon

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["prior"] = [s.to_dict() for s in self.prior]
    return d


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Every mechanism of a run plus the compiled mechanisms built from the same numbers.

  Attributes:
    mechanisms: accounting records in report order (example, client) or (paper,).
    dpsgd: the client step's per-example DP-SGD spec, or None.
    central: with dp.noise_at='server', the aggregator's release of the same spec (the clients
      then only clip), or None.
    paper: the paper-mode group release spec, or None.
    server: the server's client-level DP spec, or None.
    max_batch: the physical Poisson batch of the example-level mechanism (0: not fixed here).
    public: what the guarantee assumes public, beyond the config (for the report).
  """
  mechanisms: tuple[Mechanism, ...]
  dpsgd: DPSGD | None = None
  central: CentralDPSGD | None = None
  paper: PaperGroups | None = None
  server: ClientDP | None = None
  max_batch: int = 0
  public: dict = dataclasses.field(default_factory=dict)

  def get(self, name: str) -> Mechanism | None:
    return next((m for m in self.mechanisms if m.name == name), None)

  def ledger(self, rounds_done: int) -> Ledger:
    return Ledger.of(rounds_done, (m.entry(rounds_done) for m in self.mechanisms))

  def to_dict(self) -> dict:
    return {"mechanisms": [m.to_dict() for m in self.mechanisms],
            "client_sum_noise": self.server.sum_noise if self.server else 0.0,
            "client_count_noise": (self.server.adaptive.count_noise
                                   if self.server and self.server.adaptive else 0.0),
            "expected_clients": self.server.expected_clients if self.server else 0.0,
            "paper_noise_std": self.paper.noise_std if self.paper else 0.0,
            "max_batch": self.max_batch, "noise_at": "server" if self.central else "client",
            "public": self.public}


def _event_fn(prior: tuple[Segment, ...], sampling_rate: float, releases: int,
              dataset_size: int = 0, max_batch: int = 0):
  """sigma -> the DpEvent of the prior segments and this run's `releases` (the same composition
  `Mechanism.entry` reports, so calibration and the ledger cannot disagree)."""
  return lambda sigma: segments_event(prior + (Segment(
      sampling_rate, sigma, releases, dataset_size=dataset_size, max_batch=max_batch),))


def _prior_budget(prior: tuple[Segment, ...], delta: float, field: str) -> float:
  extra = sum(s.extra_delta for s in prior)
  if extra >= delta:
    raise ValueError(f"{field}={delta} is used up by the starting adapter's delta ({extra:.3g}); "
                     "raise it.")
  return extra


def _example(cfg, prior: tuple[Segment, ...]):
  dp, fed, d = cfg.dp, cfg.fed, cfg.data
  n_pub, b = d.max_client_size, d.batch_size
  if n_pub <= 0:
    raise ValueError(f"data.max_client_size={n_pub}: example-level DP needs a public upper "
                     "bound on every client's number of examples (the sampling rate, the noise and "
                     "the physical batch are derived from it, never from the private sizes).")
  if b > n_pub:
    raise ValueError(f"data.batch_size={b} exceeds data.max_client_size={n_pub}.")
  if dp.delta >= 1.0 / n_pub and not dp.allow_large_delta:
    raise ValueError(f"dp.delta={dp.delta} >= 1/{n_pub} (one over data.max_client_size): such a "
                     "delta allows releasing an example outright; lower it or set "
                     "dp.allow_large_delta=True.")
  q = b / n_pub
  steps = fed.rounds * fed.local_steps
  prior_extra = _prior_budget(prior, dp.delta, "dp.delta")
  budget = dp.delta - prior_extra
  mb = cfg.optim.microbatch_size
  truncation = dp.truncation_method
  if truncation == "accounted":
    if dp.accountant != "pld":
      raise ValueError(f"dp.truncation='accounted' needs dp.accountant='pld' (got "
                       f"{dp.accountant!r}): RDP cannot account truncated Poisson sampling.")
    acc_delta, trunc_budget = budget, 0.0
  else:
    acc_delta = budget * (1.0 - dp.truncation_delta_fraction)
    trunc_budget = budget * dp.truncation_delta_fraction
  plain = _event_fn(prior, q, steps)

  def sigma_for(event):
    if dp.noise_multiplier > 0:
      return float(dp.noise_multiplier)
    return accounting.calibrate(event, dp.target_epsilon, acc_delta, dp.accountant,
                                what=f"over {steps} steps at q={q:.4g} ")

  sigma = sigma_for(plain)
  size = n_pub + 1  # the neighbour that adds an example to a client at the public bound
  if truncation == "accounted":
    max_batch = (_round_up(dp.max_batch_size, mb) if dp.max_batch_size else
                 _accounted_max_batch(prior, q, steps, size, sigma, acc_delta, b, mb,
                                      dp.truncation_slack))
    max_batch = min(max_batch, _round_up(size, mb))
    event = _event_fn(prior, q, steps, size, max_batch)
    sigma = sigma_for(event)
    eps = accounting.epsilon(event(sigma), acc_delta, dp.accountant)
    trunc = 0.0
  else:
    eps = accounting.epsilon(plain(sigma), acc_delta, dp.accountant)
    if dp.max_batch_size:
      max_batch = _round_up(dp.max_batch_size, mb)
    else:
      max_batch = sampling.choose_max_batch(n_pub, q, steps, eps, trunc_budget, mb)
    trunc = sampling.truncation_delta(n_pub, q, max_batch, steps, eps)
    if trunc > trunc_budget:
      raise ValueError(f"dp.max_batch_size={dp.max_batch_size} is too small: cutting over-full "
                       f"Poisson samples would cost delta {trunc:.3g} > {trunc_budget:.3g}; raise "
                       "it, set 0 (automatic), or account it (dp.truncation='accounted').")
  accounted = truncation == "accounted"
  mech = Mechanism(
      name="example", unit=UNITS["example"], sampling_rate=q, releases_per_round=fed.local_steps,
      rounds=fed.rounds, noise_multiplier=sigma, delta=acc_delta + trunc + prior_extra,
      accountant_delta=acc_delta, accountant=dp.accountant, epsilon=eps, extra_delta=trunc,
      dataset_size=size if accounted else 0, max_batch=max_batch if accounted else 0,
      prior=prior,
      details={"clip_norm": dp.clip_norm, "expected_batch": b, "max_batch": max_batch,
               "truncation": truncation, "truncation_delta": trunc, "max_client_size": n_pub,
               "noise_at": dp.noise_at,
               "note": "client sampling not credited (conservative)"
                       + ("; noise added once by the aggregator, which must be trusted: it sees "
                          + aggregator_sees(cfg.lora.centre != "none")
                          if dp.noise_at == "server" else "")})
  return mech, DPSGD(float(dp.clip_norm), sigma, float(b)), max_batch


def aggregator_sees(centred: bool) -> str:
  """What a trusted aggregator (`dp.noise_at='server'`) sees un-noised: the plan's note, the run
  summary and `launch.privacy` say it in these words."""
  return ("each client's clipped, un-noised gradient sum"
          + (" and its clipped, un-noised sums for the LoRA centre" if centred else ""))


def _round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


def _accounted_max_batch(prior, q: float, steps: int, size: int, sigma: float, delta: float,
                         expected: int, multiple: int, slack: float) -> int:
  """The smallest multiple of `multiple` (>= the expected batch) whose truncated eps at `sigma`
  is within `slack` of the untruncated eps (eps falls as max_batch grows: bisection)."""
  untruncated = accounting.epsilon(_event_fn(prior, q, steps)(sigma), delta, "pld")
  lo, hi = _round_up(expected, multiple) // multiple, _round_up(size, multiple) // multiple
  while lo < hi:
    mid = (lo + hi) // 2
    e = accounting.epsilon(_event_fn(prior, q, steps, size, mid * multiple)(sigma), delta, "pld")
    if e <= untruncated * (1 + slack):
      hi = mid
    else:
      lo = mid + 1
  return lo * multiple


def _client(cfg, prior: tuple[Segment, ...]):
  dp, fed = cfg.dp, cfg.fed
  p = float(fed.client_rate)
  prior_extra = _prior_budget(prior, dp.client_delta, "dp.client_delta")
  acc_delta = dp.client_delta - prior_extra
  event = _event_fn(prior, p, fed.rounds)

  if dp.client_noise_multiplier > 0:
    sigma = float(dp.client_noise_multiplier)
  else:
    sigma = accounting.calibrate(event, dp.client_target_epsilon, acc_delta, dp.accountant,
                                 field="dp.client_target_epsilon",
                                 what=f"over {fed.rounds} rounds at p={p:.4g} ")
  expected = p * fed.num_clients
  sum_noise, adaptive = sigma, None
  if dp.adaptive:
    count_noise = float(dp.adaptive_clip_count_noise or expected / 20.0)
    if not count_noise > sigma / 2:
      raise ValueError(f"dp.adaptive_clip_count_noise={count_noise:.4g} must exceed sigma/2 = "
                       f"{sigma / 2:.4g}: the count release would spend the whole budget; raise "
                       "it or the number of clients, or use fixed clipping.")
    sum_noise = (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5
    adaptive = AdaptiveClip(float(dp.adaptive_clip_quantile), float(dp.adaptive_clip_lr),
                            count_noise, expected)
  eps = accounting.epsilon(event(sigma), acc_delta, dp.accountant)
  mech = Mechanism(
      name="client", unit=UNITS["client"], sampling_rate=p, releases_per_round=1,
      rounds=fed.rounds, noise_multiplier=sigma, delta=acc_delta + prior_extra,
      accountant_delta=acc_delta, accountant=dp.accountant, epsilon=eps, prior=prior,
      details={"clip_norm": dp.client_clip_norm, "adaptive": dp.adaptive,
               "quantile": dp.adaptive_clip_quantile, "sum_noise_multiplier": sum_noise,
               "count_noise_std": adaptive.count_noise if adaptive else 0.0,
               "count_sensitivity": 0.5 if adaptive else 0.0, "expected_clients": expected})
  return mech, ClientDP(sum_noise, expected, adaptive)


def _paper(cfg, prior: tuple[Segment, ...]):
  dp = cfg.dp
  groups = 1 if (cfg.fed.aggregation == "ffa" or cfg.lora.freeze_a) else 2
  sigma = (float(dp.noise_multiplier) if dp.noise_multiplier > 0
           else paper_sigma(dp.target_epsilon, dp.delta))
  b = cfg.data.batch_size
  std = sigma * dp.clip_norm / (b if dp.paper_noise == "sigma_c_over_b" else 1)
  honest = std / (2.0 * dp.clip_norm)  # per-group sensitivity 2C
  claimed = paper_epsilon(sigma, dp.delta)
  prior_extra = _prior_budget(prior, dp.delta, "dp.delta")
  acc_delta = dp.delta - prior_extra
  eps = accounting.epsilon(_event_fn(prior, 1.0, cfg.fed.rounds * groups)(honest), acc_delta,
                           dp.accountant)
  mech = Mechanism(
      name="paper", unit=UNITS["paper"], sampling_rate=1.0, releases_per_round=groups,
      rounds=cfg.fed.rounds, noise_multiplier=honest, delta=dp.delta, accountant_delta=acc_delta,
      accountant=dp.accountant, epsilon=eps, prior=prior,
      details={"paper_sigma": sigma, "paper_epsilon_per_iteration": claimed,
               "paper_formula_valid": claimed < 1.0, "noise_std": std, "clip_norm": dp.clip_norm,
               "groups": groups, "sensitivity_per_group": 2 * dp.clip_norm,
               "paper_noise": dp.paper_noise})
  return mech, PaperGroups(float(dp.clip_norm), std)


def centre_segments(cfg) -> tuple[Segment, ...]:
  """The centred LoRA's release (`lora.centre`, `federated.centre`): one Gaussian of sensitivity 1
  per example, over every client's whole data (no sampling), made once before round 1."""
  if cfg.lora.centre == "none" or not cfg.dp.sample_level:
    return ()
  return (Segment(1.0, float(cfg.dp.centre_noise_multiplier), 1, source="lora centre"),)


def priors_from(cfg, ledger: Ledger | None) -> dict[str, tuple[Segment, ...]]:
  """Segments of a starting adapter's ledger per mechanism of `cfg` (see `make_plan`).

  Raises:
    ValueError: the adapter's ledger lacks a guarantee for a unit this run protects.
  """
  if ledger is None:
    return {}
  names = _names(cfg)
  out = {}
  for name in names:
    entry = ledger.get(name)
    if entry is None:
      have = [e.name for e in ledger.entries] or ["none: trained without DP"]
      raise ValueError(
          f"lora.init_from={cfg.lora.init_from!r}: the adapter's privacy ledger has no "
          f"{name}-level guarantee (it has {have}), so this run's {name}-level eps cannot be "
          "stated; start from another adapter, or set lora.init_from_public=True if it was "
          "trained without this run's private data.")
    # the adapter's own run becomes an earlier segment of this one
    out[name] = tuple(dataclasses.replace(s, source="starting adapter")
                      if s.source == "this run" else s for s in entry.segments)
  return out


def _names(cfg) -> list[str]:
  dp = cfg.dp
  return ((["example"] if dp.sample_level else []) + (["client"] if dp.client_level else [])
          + (["paper"] if dp.mode == "paper" else []))


def make_plan(cfg, prior: Ledger | None = None) -> PrivacyPlan:
  """Builds the plan of `cfg` (a `config.RunConfig`) from public values only.

  Args:
    prior: the ledger of the starting adapter (`lora.init_from`) when it is not declared public;
      its segments are composed into every mechanism of the same unit.

  Raises:
    ValueError: unreachable targets, deltas too large for the unit count, a missing public size
      bound, inconsistent adaptive-clipping noise, or a prior without this run's units.
  """
  priors = priors_from(cfg, prior)
  mechanisms, kw = [], {}
  if cfg.dp.sample_level:
    mech, kw["dpsgd"], kw["max_batch"] = _example(
        cfg, priors.get("example", ()) + centre_segments(cfg))
    mechanisms.append(mech)
    if cfg.dp.noise_at == "server":
      kw["central"] = CentralDPSGD(kw["dpsgd"], float(cfg.optim.learning_rate))
  if cfg.dp.client_level:
    mech, kw["server"] = _client(cfg, priors.get("client", ()))
    mechanisms.append(mech)
  if cfg.dp.mode == "paper":
    mech, kw["paper"] = _paper(cfg, priors.get("paper", ()))
    mechanisms.append(mech)
  public = {"config": "every field (it is in summary.json)"}
  if cfg.data.max_client_size:
    public["max_client_size"] = cfg.data.max_client_size
  if cfg.lora.init_from:
    public["init_from"] = ("declared public (lora.init_from_public)" if cfg.lora.init_from_public
                           else "private: its ledger is composed")
  return PrivacyPlan(tuple(mechanisms), public=public, **kw)
