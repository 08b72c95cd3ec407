"""The run's report: summary.json content and the human-readable table `make demo` prints."""

from __future__ import annotations

import math

from dplora_jax.dp import plan as plan_lib
from dplora_jax.metrics import Communication


def summary(cfg, plan: plan_lib.PrivacyPlan, spent: dict, comm: Communication, *, sizes,
            devices: int, max_batch: int, lora_params: int, before: dict, after: dict,
            first_round_seconds, wall_seconds: float, poisson_overflows: int,
            noise_key_source: str, a_frozen: bool) -> dict:
  """Everything a consortium asks after a run, JSON-serialisable.

  `epsilon`, `delta`, `noise_multiplier`, `protected_unit` are the first mechanism's (the
  example-level one when present); `privacy` lists every mechanism with the eps actually spent.
  """
  mechs = []
  for m in plan.mechanisms:
    d = m.to_dict()
    d["epsilon_spent"] = spent.get(m.name, 0.0)
    mechs.append(d)
  head = plan.mechanisms[0] if plan.mechanisms else None
  return {
      "mode": cfg.dp.mode, "aggregation": cfg.fed.aggregation,
      "epsilon": spent[head.name] if head else math.inf,
      "delta": head.delta if head else 0.0,
      "noise_multiplier": head.noise_multiplier if head else 0.0,
      "accountant": cfg.dp.accountant if head else None,
      "sampling_rate": head.sampling_rate if head else None,
      "protected_unit": head.unit if head else None,
      "privacy": mechs, "noise_key_source": noise_key_source if head else None,
      "truncation_delta": plan.sample.truncation_delta if plan.sample else None,
      "max_batch": max_batch, "expected_batch": cfg.data.batch_size,
      "clip_norm": cfg.dp.clip_norm if head else None,
      "rounds": cfg.fed.rounds, "clients": cfg.fed.num_clients,
      "clients_per_round": cfg.fed.client_rate * cfg.fed.num_clients,
      "local_steps": cfg.fed.local_steps, "client_sizes": sizes, "devices": devices,
      "lora_params": lora_params, "lora_bytes": comm.lora_bytes, "a_frozen": a_frozen,
      "bytes_up_total": comm.up_total, "bytes_down_total": comm.down_total,
      "bytes_setup_down": comm.setup_down, "full_model_bytes": comm.full_model_bytes,
      "eval": {"before": before, "after": after},
      "first_round_seconds": first_round_seconds, "wall_seconds": wall_seconds,
      "poisson_overflows": poisson_overflows, "seed": cfg.seed,
  }


def privacy_lines(mechs: list[dict]) -> list[str]:
  """One line per mechanism: what it protects and at which (eps, delta)."""
  lines = []
  for m in mechs:
    eps = m.get("epsilon_spent", m["epsilon"])
    line = (f"  privacy [{m['name']}]: eps = {eps:.3f}, delta = {m['delta']:.2g} "
            f"(noise multiplier {m['noise_multiplier']:.3f}, q = {m['sampling_rate']:.4g}, "
            f"{m['releases_per_round'] * m['rounds']} releases, {m['accountant']}); "
            f"unit: {m['unit']}")
    lines.append(line)
    if m["name"] == "paper":
      d = m["details"]
      lines.append(f"    the paper's claim: eps = {d['paper_epsilon_per_iteration']:.3f} per "
                   f"iteration (sigma = {d['paper_sigma']:.3f}; formula valid only for eps < 1: "
                   f"{d['paper_formula_valid']}); honest end-to-end eps above")
  return lines


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def format_summary(s: dict) -> str:
  """The human report `make demo` prints."""
  b, a = s["eval"]["before"], s["eval"]["after"]
  ratio = s["bytes_up_total"] / max(1, s["full_model_bytes"] * s["rounds"] *
                                    s["clients_per_round"])
  lines = [f"DP federated LoRA ({s['mode']}, {s['aggregation']}): {s['rounds']} rounds x "
           f"{s['clients']} clients x {s['local_steps']} local steps"]
  lines += privacy_lines(s["privacy"]) or ["  privacy: none (dp.mode = 'none')"]
  if s["noise_key_source"]:
    lines.append(f"  noise key: {s['noise_key_source']}")
  lines += [
      f"  zero-shot : accuracy {b['accuracy']:.3f}, macro F1 {b['f1_macro']:.3f}  (n={b['n']})",
      f"  fine-tuned: accuracy {a['accuracy']:.3f}, macro F1 {a['f1_macro']:.3f}",
      f"  sent up {_size(s['bytes_up_total'])} "
      f"(LoRA {_size(s['lora_bytes'])} per client per round; full model "
      f"{_size(s['full_model_bytes'])}: {ratio:.2%} of sending it)",
      f"  wall time {s['wall_seconds']:.0f} s",
  ]
  return "\n".join(lines)
