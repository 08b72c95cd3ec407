"""The privacy ledger: what has been spent on each protected unit, in a form that composes.

A `LedgerEntry` is one unit's guarantee (example-, client- or paper-level) as a list of
`Segment`s: this run's releases so far, after those of earlier runs on the same data (a
`lora.init_from` adapter carries its ledger). eps is always recomputed with dp-accounting from the
segments (never summed), so a ledger read back from a checkpoint or an adapter states exactly the
guarantee of everything that produced the weights it sits beside.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

from dplora_jax.dp import accounting

LEDGER_VERSION = 2  # 2: segments may be truncated-Poisson (dataset_size, max_batch)
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Segment:
  """`releases` Poisson-sampled (rate q; 1 = no sampling) Gaussian releases with multiplier sigma.

  Over-full samples (cut to a random subset) are paid for one of two ways: `extra_delta` charged
  outside the accountant (`dp.sampling.truncation_delta`), or, with `max_batch` > 0, in the
  event itself (`accounting.truncated_dpsgd_event` on `dataset_size` records, PLD only).
  """
  sampling_rate: float
  noise_multiplier: float
  releases: int
  extra_delta: float = 0.0
  source: str = "this run"
  dataset_size: int = 0
  max_batch: int = 0

  def event(self):
    if self.max_batch:
      return accounting.truncated_dpsgd_event(self.dataset_size, self.sampling_rate,
                                              self.max_batch, self.noise_multiplier,
                                              self.releases)
    return accounting.dpsgd_event(self.sampling_rate, self.noise_multiplier, self.releases)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Segment":
    return cls(float(d["sampling_rate"]), float(d["noise_multiplier"]), int(d["releases"]),
               float(d.get("extra_delta", 0.0)), str(d.get("source", "earlier run")),
               int(d.get("dataset_size", 0)), int(d.get("max_batch", 0)))


def segments_event(segments: Sequence[Segment]):
  """The DpEvent of `segments` composed: the one builder the plan calibrates with and the ledger
  reports from."""
  return accounting.composed_event([s.event() for s in segments])


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
  """One protected unit's spend: its segments composed at `accountant_delta`."""
  name: str
  unit: str
  accountant: str
  accountant_delta: float
  segments: tuple[Segment, ...]

  def event(self):
    return segments_event(self.segments)

  @functools.cached_property
  def epsilon(self) -> float:  # computed once per entry (the run loop reuses its ledger)
    return accounting.epsilon(self.event(), self.accountant_delta, self.accountant)

  @property
  def delta(self) -> float:
    return self.accountant_delta + sum(s.extra_delta for s in self.segments)

  def to_dict(self) -> dict:
    return {"name": self.name, "unit": self.unit, "accountant": self.accountant,
            "accountant_delta": self.accountant_delta, "epsilon": self.epsilon,
            "delta": self.delta, "segments": [s.to_dict() for s in self.segments]}

  @classmethod
  def from_dict(cls, d: dict) -> "LedgerEntry":
    return cls(d["name"], d["unit"], d["accountant"], float(d["accountant_delta"]),
               tuple(Segment.from_dict(s) for s in d["segments"]))


@dataclasses.dataclass(frozen=True)
class Ledger:
  """Every unit's spend after `rounds` rounds of this run (and whatever came before it)."""
  rounds: int
  entries: tuple[LedgerEntry, ...] = ()

  def get(self, name: str) -> LedgerEntry | None:
    return next((e for e in self.entries if e.name == name), None)

  def epsilons(self) -> dict[str, float]:
    return {e.name: e.epsilon for e in self.entries}

  def to_dict(self) -> dict:
    return {"ledger_version": LEDGER_VERSION, "rounds": self.rounds,
            "entries": [e.to_dict() for e in self.entries]}

  @classmethod
  def from_dict(cls, d: dict) -> "Ledger":
    version = d.get("ledger_version")
    if version not in READABLE_VERSIONS:
      raise ValueError(f"privacy ledger version {version!r}; this dplora_jax reads versions "
                       f"{', '.join(map(str, READABLE_VERSIONS))}.")
    return cls(int(d["rounds"]), tuple(LedgerEntry.from_dict(e) for e in d["entries"]))

  @classmethod
  def of(cls, rounds: int, entries: Iterable[LedgerEntry]) -> "Ledger":
    return cls(rounds, tuple(entries))
