"""The run loop: build everything from a RunConfig, train rounds, evaluate, report.

The host only prepares each round's samples (indices, masks, weights) and logs; every round is one
call of the compiled SPMD `round_step`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dplora_jax import lora as lora_lib
from dplora_jax.config import RunConfig
from dplora_jax.data import classification as data_lib
from dplora_jax.dp import accounting, sampling
from dplora_jax.federated import client as client_lib, partition as partition_lib
from dplora_jax.federated import round as round_lib
from dplora_jax.metrics import Communication, JsonlWriter, tree_bytes
from dplora_jax.models import ModelConfig, build_model, load_model, load_tokenizer
from dplora_jax.tasks import classification as eval_lib

# Purposes of the root key's children: each stream feeds one thing only.
KEY_INIT, KEY_NOISE = 0, 1


@dataclasses.dataclass
class Setup:
  """Everything built before training (no compilation yet)."""
  cfg: RunConfig
  graphdef: Any
  lora: Any
  frozen: Any
  tokenizer: Any
  clients: list  # per-client Examples
  eval_examples: Any
  answers: list
  plan: accounting.SamplePlan | None
  max_batch: int
  full_model_bytes: int


def _load(cfg: RunConfig):
  m = cfg.model
  if m.random_init:
    tok = load_tokenizer(m.tokenizer or m.path)
    arch = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=m.hidden_size,
                      num_layers=m.num_layers, num_heads=m.num_heads,
                      num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
                      intermediate_size=m.intermediate_size, tie_embeddings=True,
                      dtype=m.dtype, param_dtype=m.param_dtype)
    return build_model(arch, seed=cfg.seed), tok
  loaded = load_model(m.path, dtype=m.dtype, param_dtype=m.param_dtype)
  return loaded.model, loaded.tokenizer


def _data_path(p: str, default: str) -> str:
  p = p or default
  return p if os.path.isabs(p) or os.path.exists(p) else data_lib.packaged(p)


def build(cfg: RunConfig) -> Setup:
  """Loads model and data, partitions clients and fixes the privacy plan (all checks first)."""
  d = cfg.data
  train_records = data_lib.read_records(_data_path(d.train_file, "tfns/train.jsonl"))
  eval_records = data_lib.read_records(_data_path(d.eval_file, "tfns/validation.jsonl"))
  rng = np.random.default_rng(cfg.seed)
  if d.max_train_examples and len(train_records) > d.max_train_examples:
    keep = np.sort(rng.choice(len(train_records), d.max_train_examples, replace=False))
    train_records = [train_records[i] for i in keep]
  if d.eval_examples and len(eval_records) > d.eval_examples:
    keep = np.sort(np.random.default_rng(1234).choice(len(eval_records), d.eval_examples,
                                                      replace=False))  # fixed eval subset
    eval_records = [eval_records[i] for i in keep]
  labels = np.asarray([data_lib.label_id(r.get("label", 0), d.labels, "train data", i)
                       for i, r in enumerate(train_records)], np.int64)
  field_values = ([r.get(cfg.fed.partition_field) for r in train_records]
                  if cfg.fed.partition == "field" else None)
  parts = partition_lib.partition(labels, cfg.fed.num_clients, method=cfg.fed.partition,
                                  alpha=cfg.fed.dirichlet_alpha, field_values=field_values,
                                  seed=cfg.seed)
  sizes = [len(p) for p in parts]
  mb = cfg.optim.microbatch_size
  plan = None
  if cfg.dp.mode == "sample":
    plan = accounting.plan_sample_dp(cfg.dp, sizes, d.batch_size, cfg.fed.rounds,
                                     cfg.fed.local_steps, mb)
    max_batch = plan.max_batch
  else:
    if d.batch_size > min(sizes):
      raise ValueError(f"data.batch_size={d.batch_size} exceeds the smallest client's "
                       f"{min(sizes)} examples.")
    if d.sampling == "poisson":  # no privacy: only keep over-full samples rare (1e-9)
      max_batch = sampling.max_batch_for_clients(sizes, d.batch_size, 1, 0.0, 1e-9, mb)
    else:
      max_batch = int(math.ceil(d.batch_size / mb) * mb)

  model, tok = _load(cfg)
  full_model_bytes = tree_bytes(jax.tree.leaves(model))
  lora_lib.add_lora(model, cfg.lora, jax.random.fold_in(jax.random.key(cfg.seed), KEY_INIT))
  graphdef, lora, frozen = lora_lib.split(model)
  kw = dict(labels=d.labels, prompt=d.prompt, max_length=d.max_length)
  train = data_lib.build_examples(train_records, tok, source="train data", **kw)
  evals = data_lib.build_examples(eval_records, tok, source="eval data", **kw)
  clients = [train.subset(p) for p in parts]
  answers = data_lib.label_token_ids(tok, d.labels)
  return Setup(cfg, graphdef, lora, frozen, tok, clients, evals, answers, plan, max_batch,
               full_model_bytes)


def _stack_clients(clients, num_slots: int):
  """dict of [num_slots, n_max, T] arrays (padding clients and rows are zeros)."""
  n_max = max(len(c) for c in clients)
  t = clients[0].tokens.shape[1]
  out = {k: np.zeros((num_slots, n_max, t), getattr(clients[0], k).dtype)
         for k in ("tokens", "mask", "targets", "loss_mask")}
  for i, c in enumerate(clients):
    for k in out:
      out[k][i, :len(c)] = getattr(c, k)
  return out


def run(cfg: RunConfig, workdir: str, *, progress: bool = True) -> dict:
  """Trains `cfg`; writes workdir/metrics.jsonl and workdir/summary.json.

  Returns:
    The summary dict, plus the final global LoRA pytree under "_lora" (not written to JSON).
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  s = build(cfg)
  k = cfg.fed.num_clients
  mesh = round_lib.make_mesh(min(jax.device_count(), k))
  n_dev = mesh.devices.size
  slots = int(math.ceil(k / n_dev) * n_dev)
  private = cfg.dp.mode == "sample"
  spec = client_lib.ClientSpec(
      private=private, clip_norm=float(cfg.dp.clip_norm),
      noise_multiplier=float(s.plan.noise_multiplier) if private else 0.0,
      expected_batch=cfg.data.batch_size, microbatch=cfg.optim.microbatch_size,
      local_steps=cfg.fed.local_steps)
  client_tx = client_lib.make_client_optimizer(cfg.optim.optimizer, cfg.optim.learning_rate,
                                               cfg.optim.weight_decay)
  server_tx = round_lib.make_server_optimizer(cfg.fed.server_optimizer, cfg.fed.server_lr)
  round_step = round_lib.make_round_step(s.graphdef, spec, client_tx, server_tx, mesh)

  sizes = [len(c) for c in s.clients]
  data = round_lib.shard_clients(mesh, _stack_clients(s.clients, slots))
  client_ids = round_lib.shard_clients(mesh, np.arange(slots, dtype=np.int32))
  frozen = round_lib.replicate(mesh, s.frozen)
  state = round_lib.replicate(mesh, round_lib.init_state(s.lora, server_tx))
  root = jax.random.key(cfg.seed)
  noise_key = jax.random.fold_in(root, KEY_NOISE)
  sampler = sampling.PoissonSampler(sizes, cfg.data.batch_size, s.max_batch, seed=cfg.seed + 1,
                                    poisson=cfg.data.sampling == "poisson")
  client_rng = np.random.default_rng(cfg.seed + 2)
  base_w = np.asarray(sizes if cfg.fed.weighting == "examples" else [1] * k, np.float32)
  comm = Communication(lora_lib.nbytes(s.lora), s.full_model_bytes)
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  if os.path.exists(writer.path):
    os.remove(writer.path)

  pad = s.tokenizer.pad_token_id
  n_labels = len(cfg.data.labels)
  before = eval_lib.evaluate(s.graphdef, s.lora, s.frozen, s.eval_examples, s.answers, pad,
                             n_labels)
  initial = jax.tree.map(np.asarray, s.lora)
  eps = 0.0
  compile_s = None
  bar = tqdm(range(cfg.fed.rounds), desc="rounds", disable=not progress)
  for r in bar:
    if private:
      eps_next = s.plan.epsilon_after(r + 1)
      if eps_next > s.plan.epsilon * (1 + 1e-9) or (
          cfg.dp.noise_multiplier == 0 and eps_next > cfg.dp.target_epsilon * (1 + 1e-9)):
        raise RuntimeError(f"budget guard: round {r + 1} would spend eps={eps_next:.4f} beyond "
                           f"the planned {s.plan.epsilon:.4f}.")
    t0 = time.time()
    part = sampling.sample_clients(client_rng, k, cfg.fed.client_rate)
    idx, valid = sampler.sample(cfg.fed.local_steps, slots)
    weights = np.zeros((slots,), np.float32)
    weights[:k] = base_w * part
    state, metrics = round_step(state, frozen, data,
                                round_lib.shard_clients(mesh, idx),
                                round_lib.shard_clients(mesh, valid),
                                round_lib.shard_clients(mesh, weights), client_ids, noise_key)
    metrics = jax.device_get(metrics)
    seconds = time.time() - t0
    if compile_s is None:
      compile_s = seconds
      moved = any(not np.array_equal(a, np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(initial), jax.tree.leaves(state.lora)))
      if not moved and metrics["participants"] > 0:
        raise RuntimeError("guard: the LoRA weights did not move in round 1 (learning rate 0, "
                           "or every update was zero); refusing to spend privacy on nothing.")
    if not all(np.isfinite(v) for v in metrics.values()):
      raise FloatingPointError(f"round {r + 1}: non-finite metrics {metrics}.")
    if private:
      eps = eps_next
    up, down = comm.record_round(int(metrics["participants"]))
    record = {"round": r + 1, "loss": float(metrics["loss"]), "epsilon": eps,
              "clip_fraction": float(metrics["clip_fraction"]),
              "noise_to_signal": float(metrics["noise_norm"] / max(metrics["signal_norm"], 1e-12)),
              "participants": int(metrics["participants"]), "bytes_up": up, "bytes_down": down,
              "seconds": seconds}
    if (r + 1) % cfg.log_every == 0 or r + 1 == cfg.fed.rounds:
      writer.write(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", eps=f"{eps:.2f}",
                    MB=f"{comm.up_total / 2**20:.1f}")

  lora = state.lora
  after = eval_lib.evaluate(s.graphdef, lora, s.frozen, s.eval_examples, s.answers, pad, n_labels)
  summary = {
      "mode": cfg.dp.mode, "epsilon": eps if private else math.inf,
      "delta": s.plan.delta if private else 0.0,
      "noise_multiplier": s.plan.noise_multiplier if private else 0.0,
      "accountant": cfg.dp.accountant if private else None,
      "sampling_rate": s.plan.sampling_rate if private else None,
      "truncation_delta": s.plan.truncation_delta if private else None,
      "max_batch": s.max_batch, "expected_batch": cfg.data.batch_size,
      "clip_norm": cfg.dp.clip_norm if private else None,
      "protected_unit": "one example of one client" if private else None,
      "rounds": cfg.fed.rounds, "clients": k,
      "clients_per_round": cfg.fed.client_rate * k, "local_steps": cfg.fed.local_steps,
      "client_sizes": sizes, "devices": n_dev,
      "lora_params": lora_lib.count_params(lora), "lora_bytes": comm.lora_bytes,
      "bytes_up_total": comm.up_total, "bytes_down_total": comm.down_total,
      "full_model_bytes": comm.full_model_bytes,
      "eval": {"before": before, "after": after},
      "first_round_seconds": compile_s, "wall_seconds": time.time() - t_start,
      "poisson_overflows": sampler.overflows, "seed": cfg.seed,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  return summary | {"_lora": lora}


def format_summary(summary: dict) -> str:
  """The human report `make demo` prints."""
  b, a = summary["eval"]["before"], summary["eval"]["after"]
  ratio = summary["bytes_up_total"] / max(1, summary["full_model_bytes"] *
                                          summary["rounds"] * summary["clients_per_round"])
  lines = [
      f"DP federated LoRA ({summary['mode']}): {summary['rounds']} rounds x "
      f"{summary['clients']} clients x {summary['local_steps']} local steps",
      f"  privacy: eps = {summary['epsilon']:.3f}, delta = {summary['delta']:.2g} "
      f"(sigma = {summary['noise_multiplier']:.3f}, {summary['accountant']}, unit: "
      f"{summary['protected_unit']})",
      f"  zero-shot : accuracy {b['accuracy']:.3f}, macro F1 {b['f1_macro']:.3f}  (n={b['n']})",
      f"  fine-tuned: accuracy {a['accuracy']:.3f}, macro F1 {a['f1_macro']:.3f}",
      f"  sent up {summary['bytes_up_total'] / 2**20:.2f} MiB "
      f"(LoRA {summary['lora_bytes'] / 2**20:.2f} MiB per client per round; full model "
      f"{summary['full_model_bytes'] / 2**20:.0f} MiB: {ratio:.2%} of sending it)",
      f"  wall time {summary['wall_seconds']:.0f} s",
  ]
  return "\n".join(lines)
