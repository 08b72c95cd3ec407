"""What the host carries between rounds, saved and restored as one object.

`HostState` holds the run's secret DP randomness (noise key, per-round example and client
sampling streams), the Poisson sampler, the communication totals and the number of rounds done;
the privacy ledger is a function of the plan and the rounds done (`PrivacyPlan.ledger`), written
beside it so that readers of a checkpoint (export) need not rebuild the plan.
"""

from __future__ import annotations

import dataclasses

from dplora_jax.dp import sampling
from dplora_jax.dp.randomness import DPRandomness
from dplora_jax.metrics import Communication


@dataclasses.dataclass
class HostState:
  randomness: DPRandomness
  sampler: sampling.PoissonSampler
  comm: Communication
  rounds_done: int = 0

  @classmethod
  def create(cls, cfg, setup, comm: Communication,
             randomness: DPRandomness | None = None) -> "HostState":
    randomness = randomness or DPRandomness(cfg.dp.reproducible_seed)
    sampler = sampling.PoissonSampler([len(c) for c in setup.clients], setup.rates,
                                      setup.max_batch, poisson=cfg.data.sampling == "poisson",
                                      fixed_batch=cfg.data.batch_size)
    return cls(randomness, sampler, comm)

  def sample_round(self, cfg, num_slots: int, round_: int):
    """(participating clients [K] bool, idx and valid [slots, steps, Bmax]) of round `round_`
    (0-based), from the secret per-round streams: client k's sample is what a deployed client k
    draws for itself (`dplora_jax.deploy`), and asking twice for a round gives the same sample."""
    part = sampling.sample_clients(self.randomness.clients(round_), cfg.fed.num_clients,
                                   cfg.fed.client_rate)
    rngs = [self.randomness.examples(k, round_) for k in range(cfg.fed.num_clients)]
    idx, valid = self.sampler.sample(cfg.fed.local_steps, num_slots, rngs)
    return part, idx, valid

  def to_dict(self) -> dict:
    """JSON-serialisable (secret: checkpoint only)."""
    return {"rounds_done": self.rounds_done, "randomness": self.randomness.state(),
            "sampler": self.sampler.state(),
            "comm": {"up_total": self.comm.up_total, "down_total": self.comm.down_total}}

  def restore(self, d: dict):
    """Restores in place from `to_dict()` output (the sampler keeps its sizes and shapes)."""
    self.rounds_done = int(d["rounds_done"])
    self.randomness = DPRandomness.from_state(d["randomness"])
    self.sampler.restore(d["sampler"])
    self.comm.up_total, self.comm.down_total = d["comm"]["up_total"], d["comm"]["down_total"]
