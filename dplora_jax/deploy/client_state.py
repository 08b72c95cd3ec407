"""What an institution's client keeps on its own disk: its secret randomness and its ledger.

The state directory (node config `state-dir`) is owner-only and never leaves the institution:
- `dplora_client.json`: the root of the client's DP randomness (`dp.randomness.DPRandomness`, from
  its own `os.urandom`), and its example-level ledger: for every run it trained in, the
  accounted mechanism (q, sigma, steps per round, truncation) and each round it trained with the
  digest of the instruction it trained from (config, global model, S).
- `jax_cache/`: JAX's persistent compilation cache, and `plans/`: this client's own privacy plans
  per config (a ClientApp runs in a fresh process per message; both make every message after the
  first skip compilation and noise calibration).

The ledger is written (atomically) before an update leaves, so a crash never loses a release.
Its eps composes every run on this client's data (dp-accounting, `dp.ledger`), and is what the
budget guard compares with the institution's own `max-epsilon`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

from dplora_jax import workdir as workdir_lib
from dplora_jax.dp.ledger import LedgerEntry, Segment
from dplora_jax.dp.randomness import DPRandomness

STATE_FILE = "dplora_client.json"
VERSION = 1


class ClientState:
  """The client's durable state (one JSON file, 0600, replaced atomically)."""

  def __init__(self, state_dir: str):
    self.dir = os.path.abspath(state_dir)
    workdir_lib.make_private_dir(self.dir)
    self.path = os.path.join(self.dir, STATE_FILE)
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        d = json.load(f)
      if d.get("version") != VERSION:
        raise ValueError(f"{self.path}: state version {d.get('version')!r}, expected {VERSION}.")
      self.root = d["root"]
      self.runs = d["runs"]
    else:
      self.root = DPRandomness(-1).state()  # this client's own secret root
      self.runs = {}
      self.save()

  def randomness(self, run_id: str, reproducible_seed: int = -1) -> DPRandomness:
    """The client's randomness for run `run_id`: a child of its own secret root per run (streams
    are per (client, round), so without the run in the root two runs would draw the same noise
    and samples), or a reproducible seed (tests only; the node must allow it)."""
    if reproducible_seed >= 0:
      return DPRandomness(reproducible_seed)
    digest = hashlib.sha256(f"{self.root['root']}/{run_id}".encode()).digest()
    return DPRandomness(-1, _root=int.from_bytes(digest, "little"))

  def trained(self, run_id: str, round_: int) -> str | None:
    """The digest of the instruction (config, global model, S) round `round_` of `run_id` was
    trained from, or None."""
    return self.runs.get(run_id, {}).get("rounds", {}).get(str(round_))

  def rounds_trained(self, run_id: str) -> int:
    return len(self.runs.get(run_id, {}).get("rounds", {}))

  def record(self, run_id: str, round_: int, instruction_digest: str, mechanism: dict):
    """Records a trained round (call before the update leaves) and saves."""
    run = self.runs.setdefault(run_id, {"mechanism": mechanism, "rounds": {}})
    if run["mechanism"] != mechanism:
      raise ValueError(f"run {run_id}: its mechanism changed between rounds.")
    run["rounds"][str(round_)] = instruction_digest
    self.save()

  def entry(self, extra_run: tuple[str, dict] | None = None, extra_rounds: int = 0,
            accountant_delta: float | None = None) -> LedgerEntry | None:
    """The example-level ledger over every run on this data (None if nothing was trained).

    Args:
      extra_run: (run_id, mechanism) of a run to charge `extra_rounds` more rounds (the guard's
        "what if I train once more").
      accountant_delta: the delta to report eps at (default: the largest of the runs').
    """
    runs = {k: dict(v, n=len(v["rounds"])) for k, v in self.runs.items()}
    if extra_run is not None:
      rid, mech = extra_run
      runs.setdefault(rid, {"mechanism": mech, "n": 0})
      runs[rid] = dict(runs[rid], n=runs[rid]["n"] + extra_rounds)
    segs, deltas, acc = [], [], "rdp"
    for rid, run in sorted(runs.items()):
      m = run["mechanism"]
      if run["n"] == 0:
        continue
      segs.append(Segment(m["sampling_rate"], m["noise_multiplier"],
                          run["n"] * m["releases_per_round"], m["extra_delta"],
                          dataset_size=m["dataset_size"], max_batch=m["max_batch"],
                          source=f"run {rid}"))
      deltas.append(m["accountant_delta"])
      acc = "pld" if m["accountant"] == "pld" or acc == "pld" else "rdp"
    if not segs:
      return None
    delta = accountant_delta if accountant_delta is not None else max(deltas)
    return LedgerEntry("example", "one example of this client (add/remove)", acc, delta,
                       tuple(segs))

  def plan(self, cfg, make):
    """The privacy plan of `cfg`, computed here once by `make(cfg)` (never taken from the
    server) and kept in this client's own directory."""
    from dplora_jax import __version__, config as config_lib
    key = hashlib.sha256(json.dumps([__version__, config_lib.to_dict(cfg)],
                                    sort_keys=True).encode()).hexdigest()
    path = os.path.join(self.dir, "plans", key + ".pkl")
    if os.path.exists(path):
      with open(path, "rb") as f:
        return pickle.load(f)
    plan = make(cfg)
    workdir_lib.make_private_dir(os.path.dirname(path))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      pickle.dump(plan, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return plan

  def save(self):
    tmp = self.path + ".tmp"
    with workdir_lib.private_open(tmp) as f:
      json.dump({"version": VERSION, "root": self.root, "runs": self.runs}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)


def mechanism_record(mech) -> dict:
  """The accounting facts of a plan's example-level `Mechanism` that the ledger keeps."""
  return {"sampling_rate": mech.sampling_rate, "noise_multiplier": mech.noise_multiplier,
          "releases_per_round": mech.releases_per_round, "extra_delta": mech.extra_delta,
          "dataset_size": mech.dataset_size, "max_batch": mech.max_batch,
          "accountant": mech.accountant, "accountant_delta": mech.accountant_delta}
