"""What each party releases, per dp.mode: the definition every default output obeys.

- sample: a client sends its update, post-processing of its DP-SGD releases (example-level
  eps); the server returns, and the final adapter is, the average of those updates.
  With dp.noise_at='server' a client sends its clipped, un-noised gradient sum to the aggregator
  (trusted, like the server of client mode); the aggregator releases the noised average update
  (`CentralDPSGD`; example-level eps against everyone but itself).
- client: a client sends its raw update (the server is trusted to clip and noise); the server
  releases the noised clipped sum / (p K), S and the noised unclipped fraction (client-level eps).
- sample+client: a client sends its DP-SGD update; the server releases its noised aggregate
  (both eps).
- paper: a client sends its update after the paper's group releases (honest paper eps); the
  server returns the average.
- none: raw updates and their average (no guarantee).

Nothing else computed from private data leaves a client or reaches metrics.jsonl, TensorBoard,
the progress bar or summary.json by default: not the training loss, clip counts, update norms,
example counts, sampler overflows or per-round times, and never the drawn noise. With
`private_diagnostics=True` those statistics are logged as local-only diagnostics, and the report
states that they are not covered by any eps.

Public by construction: the config (K, p, B, the public client-size bound, ...), the eps
spent (a function of the config), the evaluation on the public held-out set, and per-round
participation where it is a function of the secret client sampler alone (sample, paper, none).
Under client-level DP a client's presence is the protected secret, so the participant count and
the bytes actually sent are server-side facts: default outputs report their expectation (p K per
round) instead.
"""

from __future__ import annotations

import math

# Keys a default metrics.jsonl line may hold.
PUBLIC_KEYS = ("round", "epsilon", "participants", "bytes_up", "bytes_down",
               "expected_bytes_up", "expected_bytes_down", "client_clip_norm",
               "unclipped_fraction")  # plus epsilon_<mechanism>
DIAGNOSTIC_PREFIX = "private_"  # every diagnostic key carries it, so no reader mistakes one


def participation_is_public(mode: str) -> bool:
  """Whether the number of participating clients is a function of public values and the secret
  client sampler only (not of the protected unit)."""
  return mode not in ("client", "sample+client")


def round_record(mode: str, round_: int, epsilons: dict[str, float], public: dict,
                 up: int, down: int, expected_up: float, expected_down: float,
                 diagnostics: dict | None = None) -> dict:
  """One metrics line: released values only, plus prefixed diagnostics when asked for."""
  rec = {"round": round_, "epsilon": next(iter(epsilons.values()), math.inf),
         **{f"epsilon_{n}": e for n, e in epsilons.items()}}
  if participation_is_public(mode):
    rec |= {"participants": int(public["participants"]), "bytes_up": up, "bytes_down": down}
  else:
    rec |= {"expected_bytes_up": expected_up, "expected_bytes_down": expected_down}
  for key in ("client_clip_norm", "unclipped_fraction"):
    if key in public:
      rec[key] = float(public[key])
  if diagnostics:
    rec |= {DIAGNOSTIC_PREFIX + k: float(v) for k, v in diagnostics.items()}
  return rec
