"""The privacy plan of a run: every mechanism in it, the unit it protects, and its accounting.

A run holds up to two mechanisms, fixed before training from the same config that builds them:

- "example" (dp.mode sample / sample+client): DP-SGD on each client. Unit: one example of one
  client (add/remove). Each local step is a Poisson-sampled Gaussian with q = B / n_k; see
  `accounting.plan_sample_dp`.
- "client" (dp.mode client / sample+client): DP-FedAvg (McMahan et al. 2018). Unit: one whole
  client (add/remove of its dataset). Each round is a Poisson-sampled (rate p) Gaussian on the sum
  of client updates clipped to S; client sampling is credited. With adaptive clipping (Andrew et
  al. 2021) the unclipped-count release uses noise sigma_b and the update sum sigma_delta =
  (sigma^-2 - (2 sigma_b)^-2)^-1/2, which together are exactly as private as one Gaussian with
  multiplier sigma (their Theorem 1): the plan accounts sigma.
- "paper" (dp.mode paper): Algorithm 1 of the DP-LoRA paper, reported twice:
  * the paper's claim: sigma = sqrt(2 ln(1.25/delta)) / eps is the classical Gaussian mechanism
    for ONE release of sensitivity 1, valid only for eps < 1 (Dwork and Roth, Thm A.1);
  * the honest guarantee of what is released. Each round every client releases, per LoRA factor
    group (A and B; B only under FFA), clip_C(mean gradient) + N(0, s^2) with s = sigma C (or
    sigma C / B). The clipped group gradient has norm <= C for ANY batch, so replacing one example,
    or even the whole batch, moves it by at most 2C: per-group sensitivity 2C, multiplier
    s / 2C. Batches are drawn without claiming amplification (the paper claims none; an example
    may be in every batch), and nothing else protects a client between rounds, so each client
    composes groups x rounds Gaussian releases. The unit is therefore one client's whole data
    under replace-one adjacency (which covers any single example in it). Composition over
    2T releases and the doubled sensitivity are why the honest eps exceeds the per-step claim.
"""

from __future__ import annotations

import dataclasses
import math

from dplora_jax.dp import accounting

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
  """One privacy mechanism of a run and its guarantee.

  Attributes:
    name: "example", "client" or "paper".
    unit: the protected unit, in words.
    sampling_rate: Poisson rate credited by the accountant (1 = no amplification).
    releases_per_round: Gaussian releases charged per round to the unit.
    rounds: planned rounds.
    noise_multiplier: the accounted multiplier (noise std / L2 sensitivity).
    delta: the total delta reported (accountant delta + any other charge).
    accountant_delta: the delta handed to the accountant.
    accountant: "rdp" or "pld".
    epsilon: eps after all planned rounds.
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
  details: dict = dataclasses.field(default_factory=dict)

  def event(self, rounds_done: int):
    """The dp-accounting DpEvent of the first `rounds_done` rounds (the ledger's content)."""
    return accounting.dpsgd_event(self.sampling_rate, self.noise_multiplier,
                                  rounds_done * self.releases_per_round)

  def epsilon_after(self, rounds_done: int) -> float:
    return accounting.epsilon(self.event(rounds_done), self.accountant_delta, self.accountant)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Every mechanism of a run plus the numbers the compiled round needs.

  Attributes:
    mechanisms: in report order (example, client) or (paper,).
    sample: the example-level plan (physical Poisson batch) or None.
    client_sum_noise: sigma_delta, the multiplier of the noise on the clipped update sum.
    client_count_noise: sigma_b, the std of the noise on the unclipped count (adaptive only).
    expected_clients: p K, the server's fixed divisor.
    paper_noise_std: the absolute noise std per group in paper mode (sigma C or sigma C / B).
  """
  mechanisms: tuple[Mechanism, ...]
  sample: accounting.SamplePlan | None = None
  client_sum_noise: float = 0.0
  client_count_noise: float = 0.0
  expected_clients: float = 0.0
  paper_noise_std: float = 0.0

  def get(self, name: str) -> Mechanism | None:
    return next((m for m in self.mechanisms if m.name == name), None)

  def to_dict(self) -> dict:
    return {"mechanisms": [m.to_dict() for m in self.mechanisms],
            "client_sum_noise": self.client_sum_noise,
            "client_count_noise": self.client_count_noise,
            "expected_clients": self.expected_clients, "paper_noise_std": self.paper_noise_std}


def _example(dp, client_sizes, batch_size, rounds, local_steps, microbatch):
  sp = accounting.plan_sample_dp(dp, client_sizes, batch_size, rounds, local_steps, microbatch)
  mech = Mechanism(
      name="example", unit=UNITS["example"], sampling_rate=sp.sampling_rate,
      releases_per_round=local_steps, rounds=rounds, noise_multiplier=sp.noise_multiplier,
      delta=sp.delta, accountant_delta=sp.accountant_delta, accountant=dp.accountant,
      epsilon=sp.epsilon,
      details={"clip_norm": dp.clip_norm, "expected_batch": batch_size,
               "max_batch": sp.max_batch, "truncation_delta": sp.truncation_delta,
               "smallest_client": sp.smallest_client,
               "note": "client sampling not credited (conservative)"})
  return sp, mech


def _client(dp, num_clients, client_rate, rounds):
  p = float(client_rate)
  if dp.client_noise_multiplier > 0:
    sigma = float(dp.client_noise_multiplier)
  else:
    sigma = accounting.calibrate_noise(p, rounds, dp.client_target_epsilon, dp.client_delta,
                                       dp.accountant, field="dp.client_target_epsilon")
  expected = p * num_clients
  sum_noise, count_noise = sigma, 0.0
  if dp.adaptive:
    count_noise = float(dp.adaptive_clip_count_noise or expected / 20.0)
    if not count_noise > sigma / 2:
      raise ValueError(f"dp.adaptive_clip_count_noise={count_noise:.4g} must exceed sigma/2 = "
                       f"{sigma / 2:.4g}: the count release would spend the whole budget; raise "
                       "it or the number of clients, or use fixed clipping.")
    sum_noise = (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5
  eps = accounting.dpsgd_epsilon(p, sigma, rounds, dp.client_delta, dp.accountant)
  mech = Mechanism(
      name="client", unit=UNITS["client"], sampling_rate=p, releases_per_round=1, rounds=rounds,
      noise_multiplier=sigma, delta=dp.client_delta, accountant_delta=dp.client_delta,
      accountant=dp.accountant, epsilon=eps,
      details={"clip_norm": dp.client_clip_norm, "adaptive": dp.adaptive,
               "quantile": dp.adaptive_clip_quantile, "sum_noise_multiplier": sum_noise,
               "count_noise_std": count_noise, "expected_clients": expected})
  return mech, sum_noise, count_noise, expected


def _paper(dp, batch_size, rounds, groups):
  sigma = (float(dp.noise_multiplier) if dp.noise_multiplier > 0
           else paper_sigma(dp.target_epsilon, dp.delta))
  std = sigma * dp.clip_norm / (batch_size if dp.paper_noise == "sigma_c_over_b" else 1)
  honest = std / (2.0 * dp.clip_norm)  # per-group sensitivity 2C
  claimed = paper_epsilon(sigma, dp.delta)
  mech = Mechanism(
      name="paper", unit=UNITS["paper"], sampling_rate=1.0, releases_per_round=groups,
      rounds=rounds, noise_multiplier=honest, delta=dp.delta, accountant_delta=dp.delta,
      accountant=dp.accountant,
      epsilon=accounting.dpsgd_epsilon(1.0, honest, rounds * groups, dp.delta, dp.accountant),
      details={"paper_sigma": sigma, "paper_epsilon_per_iteration": claimed,
               "paper_formula_valid": claimed < 1.0, "noise_std": std, "clip_norm": dp.clip_norm,
               "groups": groups, "sensitivity_per_group": 2 * dp.clip_norm,
               "paper_noise": dp.paper_noise})
  return mech, std


def make_plan(cfg, client_sizes: list[int]) -> PrivacyPlan:
  """Builds the plan of `cfg` (a `config.RunConfig`) for these client sizes.

  Raises:
    ValueError: unreachable targets, deltas too large for the unit count, or inconsistent
      adaptive-clipping noise (naming the field).
  """
  dp, fed = cfg.dp, cfg.fed
  mechanisms, kw = [], {}
  if dp.sample_level:
    sp, mech = _example(dp, client_sizes, cfg.data.batch_size, fed.rounds, fed.local_steps,
                        cfg.optim.microbatch_size)
    mechanisms.append(mech)
    kw["sample"] = sp
  if dp.client_level:
    mech, kw["client_sum_noise"], kw["client_count_noise"], kw["expected_clients"] = _client(
        dp, fed.num_clients, fed.client_rate, fed.rounds)
    mechanisms.append(mech)
  if dp.mode == "paper":
    if cfg.data.batch_size > min(client_sizes):
      raise ValueError(f"data.batch_size={cfg.data.batch_size} exceeds the smallest client's "
                       f"{min(client_sizes)} examples.")
    groups = 1 if (fed.aggregation == "ffa" or cfg.lora.freeze_a) else 2
    mech, kw["paper_noise_std"] = _paper(dp, cfg.data.batch_size, fed.rounds, groups)
    mechanisms.append(mech)
  return PrivacyPlan(tuple(mechanisms), **kw)
