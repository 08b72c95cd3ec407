"""The run's report: summary.json content and the human-readable table `make demo` prints.

Everything here is released (`dp.release`): public config values, eps spent, evaluation on the
public held-out set, and communication. Private statistics appear only under "diagnostics", and
only when the user turned `private_diagnostics` on.
"""

from __future__ import annotations

import math

from dplora_jax.dp import plan as plan_lib, release
from dplora_jax.dp.ledger import Ledger
from dplora_jax.metrics import Communication

DIAGNOSTICS_WARNING = ("NON-PRIVATE DIAGNOSTICS: metrics.jsonl/TensorBoard hold unnoised "
                       "statistics of the private batches (private_* keys); no eps covers them. "
                       "Do not share this workdir's logs.")


def summary(cfg, plan: plan_lib.PrivacyPlan, ledger: Ledger, comm: Communication, *,
            devices: int, max_batch: int, lora_params: int, before: dict, after: dict,
            first_round_seconds, wall_seconds: float, compile_seconds: float | None = None, randomness_source: str, a_frozen: bool,
            diagnostics: dict | None = None) -> dict:
  """Everything a consortium asks after a run, JSON-serialisable.

  `epsilon`, `delta`, `noise_multiplier`, `protected_unit` are the first mechanism's (the
  example-level one when present); `privacy` lists every mechanism with the eps actually spent
  (earlier runs of a starting adapter included) and `ledger` the composable record.
  """
  mechs = []
  for m in plan.mechanisms:
    d = m.to_dict()
    entry = ledger.get(m.name)
    d["epsilon_spent"] = entry.epsilon
    d["delta_spent"] = entry.delta
    mechs.append(d)
  head = mechs[0] if mechs else None
  expected_clients = cfg.fed.client_rate * cfg.fed.num_clients
  public_participation = release.participation_is_public(cfg.dp.mode)
  out = {
      "task": cfg.data.task, "mode": cfg.dp.mode, "aggregation": cfg.fed.aggregation,
      "epsilon": head["epsilon_spent"] if head else math.inf,
      "delta": head["delta_spent"] if head else 0.0,
      "noise_multiplier": head["noise_multiplier"] if head else 0.0,
      "accountant": cfg.dp.accountant if head else None,
      "sampling_rate": head["sampling_rate"] if head else None,
      "protected_unit": head["unit"] if head else None,
      "privacy": mechs, "ledger": ledger.to_dict(),
      "assumed_public": plan.public,
      "dp_randomness": randomness_source if head else None,
      "truncation": (plan.get("example").details["truncation"] if plan.get("example") else None),
      "truncation_delta": (plan.get("example").extra_delta if plan.get("example") else None),
      "max_batch": max_batch, "expected_batch": cfg.data.batch_size,
      "max_client_size": cfg.data.max_client_size or None,
      "clip_norm": cfg.dp.clip_norm if head else None,
      "rounds": cfg.fed.rounds, "clients": cfg.fed.num_clients,
      "clients_per_round": expected_clients,
      "local_steps": cfg.fed.local_steps, "devices": devices,
      "lora_params": lora_params, "lora_rank": cfg.lora.rank, "lora_bytes": comm.lora_bytes,
      "a_frozen": a_frozen,
      "bytes_setup_down": comm.setup_down, "full_model_bytes": comm.full_model_bytes,
      "eval": {"before": before, "after": after},
      "first_round_seconds": first_round_seconds, "compile_seconds": compile_seconds,
      "wall_seconds": wall_seconds,
      "seed": cfg.seed, "private_diagnostics": bool(diagnostics is not None),
  }
  if public_participation:
    out |= {"bytes_up_total": comm.up_total, "bytes_down_total": comm.down_total,
            "bytes_are_expected": False}
  else:  # the participant count is protected under client-level DP: its expectation only
    rounds = ledger.rounds
    out |= {"bytes_up_total": comm.expected_round_bytes(expected_clients) * rounds,
            "bytes_down_total": (comm.setup_down
                                 + comm.expected_round_bytes(expected_clients) * rounds),
            "bytes_are_expected": True}
  if diagnostics is not None:
    out["diagnostics"] = {"warning": DIAGNOSTICS_WARNING, "poisson_overflows":
                          diagnostics["overflows"], "bytes_up_actual": comm.up_total}
  return out


def privacy_lines(mechs: list[dict]) -> list[str]:
  """One line per mechanism: what it protects and at which (eps, delta)."""
  lines = []
  for m in mechs:
    eps = m.get("epsilon_spent", m["epsilon"])
    delta = m.get("delta_spent", m["delta"])
    line = (f"  privacy [{m['name']}]: eps = {eps:.3f}, delta = {delta:.2g} "
            f"(noise multiplier {m['noise_multiplier']:.3f}, q = {m['sampling_rate']:.4g}, "
            f"{m['releases_per_round'] * m['rounds']} releases, {m['accountant']}); "
            f"unit: {m['unit']}")
    lines.append(line)
    centre = [g for g in m.get("prior", ()) if g["source"] == "lora centre"]
    earlier = [g for g in m.get("prior", ()) if g["source"] != "lora centre"]
    for g in centre:
      lines.append(f"    includes the LoRA centre's release before round 1 (Gaussian, noise "
                   f"multiplier {g['noise_multiplier']:.3f}, no sampling)")
    if earlier:
      lines.append(f"    includes {len(earlier)} earlier segment(s) from the starting adapter's "
                   "ledger")
    if m["name"] == "example":
      d = m["details"]
      how = (f"accounted in the PLD event (truncated Poisson on {m['dataset_size']} records)"
             if d["truncation"] == "accounted" else
             f"charged delta {d['truncation_delta']:.2g}")
      lines.append(f"    physical batch {d['max_batch']} (expected {d['expected_batch']}); "
                   f"over-full samples cut at random, {how}")
      if d.get("noise_at") == "server":
        lines.append("    noise added once by the aggregator (dp.noise_at='server'): it sees "
                     + plan_lib.aggregator_sees(bool(centre))
                     + " and must be trusted; the eps holds against everyone else (other "
                     "clients, whoever gets the adapter)")
    if m["name"] == "paper":
      d = m["details"]
      lines.append(f"    the paper's claim: eps = {d['paper_epsilon_per_iteration']:.3f} per "
                   f"iteration (sigma = {d['paper_sigma']:.3f}; formula valid only for eps < 1: "
                   f"{d['paper_formula_valid']}); honest end-to-end eps above")
  return lines


def human_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


_SHOWN = (("accuracy", "accuracy"), ("f1_macro", "macro F1"), ("acc", "acc"),
          ("acc_norm", "acc_norm"), ("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"),
          ("rouge2", "ROUGE-2"), ("perplexity", "answer perplexity"), ("nll", "label NLL"),
          ("label_nll", "NLL among the labels"))


def metric_text(m: dict) -> str:
  """'accuracy 0.712, macro F1 0.640' for the metrics a task reports."""
  return ", ".join(f"{name} {m[k]:.3f}" for k, name in _SHOWN if k in m)


def label_f1_text(m: dict) -> str:
  """'negative 0.250, positive 0.565, neutral 0.847' for a classification task ('' otherwise)."""
  return ", ".join(f"{lab} {v:.3f}" for lab, v in zip(m.get("labels", ()),
                                                      m.get("f1_per_label", ())))


def format_summary(s: dict) -> str:
  """The human report `make demo` prints."""
  b, a = s["eval"]["before"], s["eval"]["after"]
  ratio = s["bytes_up_total"] / max(1, s["full_model_bytes"] * s["rounds"] *
                                    s["clients_per_round"])
  lines = [f"DP federated LoRA ({s['mode']}, {s['aggregation']}): {s['rounds']} rounds x "
           f"{s['clients']} clients x {s['local_steps']} local steps"]
  lines += privacy_lines(s["privacy"]) or ["  privacy: none (dp.mode = 'none')"]
  if s["dp_randomness"]:
    lines.append(f"  DP randomness (noise, sampling): {s['dp_randomness']}")
  pub = dict(s.get("assumed_public") or {})
  if pub.get("max_client_size"):
    lines.append(f"  public: the config, and the bound of {pub['max_client_size']} examples per "
                 "client (client sizes themselves are not released)")
  if pub.get("init_from"):
    lines.append(f"  starting adapter: {pub['init_from']}")
  if s.get("private_diagnostics"):
    lines.append("  " + DIAGNOSTICS_WARNING)
  task = s.get("task", "tfns")
  if b or a:  # a deployment run without evaluation has neither
    lines += [
        f"  {task} held-out (n={b.get('n')}):",
        f"    zero-shot : {metric_text(b)}",
        f"    fine-tuned: {metric_text(a)}",
    ]
  if label_f1_text(a):
    lines.append(f"    F1 of each label: zero-shot {label_f1_text(b)}; "
                 f"fine-tuned {label_f1_text(a)}")
  if "majority_accuracy" in b:
    lines.append(f"    always answering the most frequent class: accuracy "
                 f"{b['majority_accuracy']:.3f}"
                 + (f" (NLL among the labels knowing only their frequencies: "
                    f"{b['prior_nll']:.3f})" if "prior_nll" in b else ""))
  lines += [
      f"  sent up {human_bytes(s['bytes_up_total'])}"
      f"{' (expected)' if s['bytes_are_expected'] else ''} "
      f"(LoRA {human_bytes(s['lora_bytes'])} per client per round; full model "
      f"{human_bytes(s['full_model_bytes'])}: {ratio:.2%} of sending it)",
      f"  wall time {s['wall_seconds']:.0f} s"
      + (f" (round compiled ahead of time in {s['compile_seconds']:.1f} s)"
         if s.get("compile_seconds") is not None else ""),
  ]
  return "\n".join(lines)
