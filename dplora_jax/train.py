"""The run loop: build everything from a RunConfig, train rounds, evaluate, report.

The host only prepares each round's samples (indices, masks, weights) and logs; every round is one
call of the compiled SPMD `round_step`.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from dplora_jax import checkpoint as ckpt_lib, config as config_lib, report
from dplora_jax.dp import plan as plan_lib, sampling
from dplora_jax.federated import aggregation, client as client_lib, partition as partition_lib
from dplora_jax.federated import round as round_lib
from dplora_jax.metrics import Communication, JsonlWriter, TensorBoardWriter, tree_bytes
from dplora_jax.models import ModelConfig, build_model, load_model, load_tokenizer
from dplora_jax.tasks import classification as eval_lib

# Purposes of the root key's children: each stream feeds one thing only.
KEY_INIT, KEY_NOISE = 0, 1


def make_noise_key(noise_seed: int) -> tuple[jax.Array, str]:
  """The run's DP-noise key and where it came from.

  A real run (noise_seed = -1) draws 64 bits from the OS entropy pool (`os.urandom`), so nobody
  who knows the config can regenerate the noise; noise_seed >= 0 reproduces a run exactly.
  """
  if noise_seed >= 0:
    return jax.random.fold_in(jax.random.key(noise_seed), KEY_NOISE), f"seed {noise_seed}"
  data = np.frombuffer(os.urandom(8), np.uint32)
  return jax.random.wrap_key_data(data), "os-entropy"


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
  plan: plan_lib.PrivacyPlan
  max_batch: int
  full_model_bytes: int
  factor_bytes: dict  # {"a": bytes of all A, "b": bytes of all B}
  model_path: str = ""
  fingerprint: str = ""  # of the base weights (checkpoints reference it)


def load_base(cfg: RunConfig):
  """(model, tokenizer, fingerprint, path) of the run's base model (no LoRA)."""
  m = cfg.model
  if m.random_init:
    tok = load_tokenizer(m.tokenizer or m.path)
    arch = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=m.hidden_size,
                      num_layers=m.num_layers, num_heads=m.num_heads,
                      num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
                      intermediate_size=m.intermediate_size, tie_embeddings=True,
                      dtype=m.dtype, param_dtype=m.param_dtype)
    ident = hashlib.sha256(repr((arch, cfg.seed)).encode()).hexdigest()
    return build_model(arch, seed=cfg.seed), tok, "random:" + ident, "<random init>"
  loaded = load_model(m.path, dtype=m.dtype, param_dtype=m.param_dtype)
  return loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.path


def load_run_tokenizer(cfg: RunConfig):
  """The tokenizer `cfg`'s run will use (without loading the model weights)."""
  m = cfg.model
  return load_tokenizer(m.tokenizer or m.path if m.random_init else m.path)


def _data_path(p: str, default: str) -> str:
  p = p or default
  return p if os.path.isabs(p) or os.path.exists(p) else data_lib.packaged(p)


def _records(cfg: RunConfig):
  """Reads train and eval records and partitions the train records into clients."""
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
  return train_records, eval_records, parts


def client_sizes(cfg: RunConfig, extra: list[int] | None = None) -> list[int]:
  """Examples per client (plus `extra` per client, e.g. audit canaries), without the model."""
  _, _, parts = _records(cfg)
  return [len(p) + (extra[i] if extra else 0) for i, p in enumerate(parts)]


def privacy_plan(cfg: RunConfig, sizes: list[int] | None = None) -> plan_lib.PrivacyPlan:
  """The run's privacy plan (reads and partitions the data; loads no model)."""
  return plan_lib.make_plan(cfg, sizes or client_sizes(cfg))


def _max_batch(cfg: RunConfig, plan: plan_lib.PrivacyPlan, sizes: list[int]) -> int:
  d, mb = cfg.data, cfg.optim.microbatch_size
  if plan.sample is not None:
    return plan.sample.max_batch
  if d.batch_size > min(sizes):
    raise ValueError(f"data.batch_size={d.batch_size} exceeds the smallest client's "
                     f"{min(sizes)} examples.")
  if d.sampling == "poisson":  # no example-level privacy: only keep over-full samples rare
    return sampling.max_batch_for_clients(sizes, d.batch_size, 1, 0.0, 1e-9, mb)
  return int(math.ceil(d.batch_size / mb) * mb)


def effective_lora(cfg: RunConfig):
  """The LoRA config actually built: FFA freezes A."""
  if cfg.fed.aggregation == "ffa" and not cfg.lora.freeze_a:
    return dataclasses.replace(cfg.lora, freeze_a=True)
  return cfg.lora


def attach_lora(model, cfg: RunConfig):
  """Attaches the run's initial LoRA: from `lora.init_from` (a PEFT adapter) or random from the
  run's init key. Deterministic, so FFA's frozen A is rebuilt identically when exporting."""
  lora_cfg = effective_lora(cfg)
  if lora_cfg.init_from:
    from dplora_jax import peft
    peft.load_adapter(model, lora_cfg.init_from, expect=lora_cfg)
  else:
    lora_lib.add_lora(model, lora_cfg, jax.random.fold_in(jax.random.key(cfg.seed), KEY_INIT))


def build(cfg: RunConfig, extra_train: list | None = None) -> Setup:
  """Loads model and data, partitions clients and fixes the privacy plan (all checks first).

  Args:
    extra_train: optional per-client `Examples` appended to each client's data (audit canaries);
      they count towards client sizes and the privacy plan.
  """
  d = cfg.data
  train_records, eval_records, parts = _records(cfg)
  extra_n = [len(e) for e in extra_train] if extra_train else None
  sizes = [len(p) + (extra_n[i] if extra_n else 0) for i, p in enumerate(parts)]
  plan = plan_lib.make_plan(cfg, sizes)
  max_batch = _max_batch(cfg, plan, sizes)

  model, tok, fingerprint, model_path = load_base(cfg)
  arch = model.config
  if d.max_length > arch.max_position_embeddings:
    raise ValueError(f"data.max_length={d.max_length} exceeds the model's "
                     f"max_position_embeddings={arch.max_position_embeddings} ({model_path}); "
                     "lower data.max_length.")
  if len(tok) > arch.vocab_size:
    raise ValueError(f"tokenizer mismatch: the tokenizer of {cfg.model.tokenizer or model_path} "
                     f"has {len(tok)} tokens but the model embeds only {arch.vocab_size}; use the "
                     "model's own tokenizer (model.tokenizer).")
  full_model_bytes = tree_bytes(jax.tree.leaves(model))
  attach_lora(model, cfg)
  factor_bytes = lora_lib.factor_bytes(model)
  graphdef, lora, frozen = lora_lib.split(model)
  kw = dict(labels=d.labels, prompt=d.prompt, max_length=d.max_length)
  train = data_lib.build_examples(train_records, tok, source="train data", **kw)
  evals = data_lib.build_examples(eval_records, tok, source="eval data", **kw)
  clients = [train.subset(p) for p in parts]
  if extra_train:
    clients = [data_lib.concat([c, e]) for c, e in zip(clients, extra_train)]
  answers = data_lib.label_token_ids(tok, d.labels)
  return Setup(cfg, graphdef, lora, frozen, tok, clients, evals, answers, plan, max_batch,
               full_model_bytes, factor_bytes, model_path, fingerprint)


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


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another "
                          "--workdir.") from e


def _truncate_metrics(path: str, last_round: int):
  """Drops metrics lines of rounds after `last_round` (they are redone after a resume)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    keep = [l for l in f if l.strip() and json.loads(l)["round"] <= last_round]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(keep)


def run(cfg: RunConfig, workdir: str, *, progress: bool = True,
        extra_train: list | None = None) -> dict:
  """Trains `cfg`, or resumes it from the newest checkpoint in `workdir`.

  Writes workdir/metrics.jsonl, workdir/tensorboard/, workdir/checkpoints/ (every
  cfg.checkpoint_every rounds and after the last) and workdir/summary.json.

  Returns:
    The summary dict, plus the final global LoRA pytree under "_lora", the final round state
    under "_state" and the Setup under "_setup" (none of them written to JSON).

  Raises:
    RuntimeError: a guard fired (LoRA did not move in round 1; the budget would be exceeded).
    FloatingPointError: a round produced a non-finite update or metric.
    CheckpointError: the workdir holds a checkpoint of a different run, or a damaged one.
    PermissionError: the workdir is not writable.
  """
  t_start = time.time()
  _check_workdir(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, cfg.checkpoint_keep) if cfg.checkpoint_every else None
  resume_round = ckpt.latest() if ckpt else None
  try:
    return _run(cfg, workdir, progress, extra_train, ckpt, resume_round, t_start)
  finally:
    if ckpt:
      ckpt.close()


def _run(cfg, workdir, progress, extra_train, ckpt, resume_round, t_start):
  meta = None
  if resume_round is not None:  # refuse a different run before loading anything
    meta = ckpt.read_meta(resume_round)
    ckpt_lib.check_resumable(meta, cfg, path=os.path.join(ckpt.directory, str(resume_round)))
  s = build(cfg, extra_train)
  if meta is not None:
    ckpt_lib.check_resumable(meta, cfg, s.fingerprint,
                             os.path.join(ckpt.directory, str(resume_round)))
  dp = cfg.dp
  k = cfg.fed.num_clients
  mesh = round_lib.make_mesh(min(jax.device_count(), k))
  n_dev = mesh.devices.size
  slots = int(math.ceil(k / n_dev) * n_dev)
  example, client_m, paper = (s.plan.get(n) for n in ("example", "client", "paper"))
  mechanism = "sample" if example else ("paper" if paper else "none")
  spec = client_lib.ClientSpec(
      mechanism=mechanism, clip_norm=float(dp.clip_norm),
      noise_multiplier=float(example.noise_multiplier) if example else 0.0,
      expected_batch=cfg.data.batch_size, microbatch=cfg.optim.microbatch_size,
      local_steps=cfg.fed.local_steps, paper_noise_std=float(s.plan.paper_noise_std))
  client_dp = None
  if client_m:
    client_dp = aggregation.ClientDP(
        sum_noise=float(s.plan.client_sum_noise), expected_clients=float(s.plan.expected_clients),
        adaptive=dp.adaptive, count_noise=float(s.plan.client_count_noise),
        quantile=float(dp.adaptive_clip_quantile), clip_lr=float(dp.adaptive_clip_lr))
  client_tx = client_lib.make_client_optimizer(cfg.optim.optimizer, cfg.optim.learning_rate,
                                               cfg.optim.weight_decay)
  server_tx = round_lib.make_server_optimizer(cfg.fed.server_optimizer, cfg.fed.server_lr)
  round_step = round_lib.make_round_step(s.graphdef, spec, client_tx, server_tx, mesh, client_dp)

  sizes = [len(c) for c in s.clients]
  data = round_lib.shard_clients(mesh, _stack_clients(s.clients, slots))
  client_ids = round_lib.shard_clients(mesh, np.arange(slots, dtype=np.int32))
  frozen = round_lib.replicate(mesh, s.frozen)
  state = round_lib.replicate(mesh, round_lib.init_state(s.lora, server_tx, dp.client_clip_norm))
  noise_key, key_source = make_noise_key(dp.noise_seed)
  sampler = sampling.PoissonSampler(sizes, cfg.data.batch_size, s.max_batch, seed=cfg.seed + 1,
                                    poisson=cfg.data.sampling == "poisson")
  client_rng = np.random.default_rng(cfg.seed + 2)
  uniform = cfg.fed.weighting == "uniform" or client_m is not None
  base_w = np.asarray([1] * k if uniform else sizes, np.float32)
  # FFA: A is part of the frozen tree, sent to every client once before round 1, never again.
  a_frozen = effective_lora(cfg).freeze_a
  comm = Communication(lora_lib.nbytes(s.lora), s.full_model_bytes,
                       setup_down=s.factor_bytes["a"] * k if a_frozen else 0)
  spent = {m.name: 0.0 for m in s.plan.mechanisms}
  start = 0
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  if meta is not None:
    tree = ckpt.restore_state(resume_round, ckpt_lib.state_tree(state, noise_key))
    state = round_lib.replicate(mesh, ckpt_lib.restored_round_state(tree, round_lib.RoundState))
    noise_key = jax.random.wrap_key_data(np.asarray(tree["noise_key"]))
    key_source = meta["noise_key_source"]
    sampler.restore(meta["sampler"])
    client_rng.bit_generator.state = meta["client_rng"]
    comm.up_total, comm.down_total = meta["comm"]["up_total"], meta["comm"]["down_total"]
    spent = {m["name"]: m["epsilon"] for m in meta["ledger"]}
    start = resume_round
    _truncate_metrics(writer.path, start)
  elif os.path.exists(writer.path):
    os.remove(writer.path)
  tb = TensorBoardWriter(workdir)

  def save(r: int):
    ckpt.save(r, state, noise_key, {
        "config": config_lib.to_dict(cfg),
        "model": {"path": s.model_path, "fingerprint": s.fingerprint},
        "ledger": [{"name": m.name, "unit": m.unit, "rounds": r,
                    "releases": r * m.releases_per_round, "sampling_rate": m.sampling_rate,
                    "noise_multiplier": m.noise_multiplier, "delta": m.delta,
                    "epsilon": spent[m.name]} for m in s.plan.mechanisms],
        "sampler": sampler.state(), "client_rng": client_rng.bit_generator.state,
        "comm": {"up_total": comm.up_total, "down_total": comm.down_total},
        "noise_key_source": key_source})

  pad = s.tokenizer.pad_token_id
  n_labels = len(cfg.data.labels)
  before = eval_lib.evaluate(s.graphdef, s.lora, s.frozen, s.eval_examples, s.answers, pad,
                             n_labels)
  initial = jax.tree.map(np.asarray, s.lora)
  compile_s = None
  bar = tqdm(range(start, cfg.fed.rounds), desc="rounds", disable=not progress,
             initial=start, total=cfg.fed.rounds)
  for r in bar:
    nxt = {m.name: m.epsilon_after(r + 1) for m in s.plan.mechanisms}
    for m in s.plan.mechanisms:
      if nxt[m.name] > m.epsilon * (1 + 1e-9):
        raise RuntimeError(f"budget guard: round {r + 1} would spend eps={nxt[m.name]:.4f} "
                           f"({m.name}-level) beyond the planned {m.epsilon:.4f}.")
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
    if not all(np.isfinite(v) for v in metrics.values()):
      raise FloatingPointError(f"guard: round {r + 1} produced a non-finite update or metric "
                               f"{ {k_: float(v) for k_, v in metrics.items()} }; stopping.")
    if compile_s is None:
      compile_s = seconds
      if r == 0:
        moved = any(not np.array_equal(a, np.asarray(b)) for a, b in
                    zip(jax.tree.leaves(initial), jax.tree.leaves(state.lora)))
        if not moved and metrics["participants"] > 0:
          raise RuntimeError("guard: the LoRA weights did not move in round 1 (learning rate 0, "
                             "or every update was zero); refusing to spend privacy on nothing.")
    spent = nxt
    up, down = comm.record_round(int(metrics["participants"]))
    record = {"round": r + 1, "loss": float(metrics["loss"]),
              "epsilon": next(iter(spent.values()), math.inf),
              **{f"epsilon_{n}": e for n, e in spent.items()},
              "clip_fraction": float(metrics["clip_fraction"]),
              "noise_to_signal": float(metrics["noise_norm"] / max(metrics["signal_norm"], 1e-12)),
              "participants": int(metrics["participants"]), "bytes_up": up, "bytes_down": down,
              "seconds": seconds}
    for key in ("client_clip_norm", "server_noise_norm", "unclipped_fraction"):
      if key in metrics:
        record[key] = float(metrics[key])
    if (r + 1) % cfg.log_every == 0 or r + 1 == cfg.fed.rounds:
      writer.write(record)
      tb.write(record)
    if ckpt and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.fed.rounds):
      save(r + 1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", eps=f"{record['epsilon']:.2f}",
                    MB=f"{comm.up_total / 2**20:.1f}")
  tb.close()

  lora = state.lora
  after = eval_lib.evaluate(s.graphdef, lora, s.frozen, s.eval_examples, s.answers, pad, n_labels)
  summary = report.summary(
      cfg, s.plan, spent, comm, sizes=sizes, devices=n_dev, max_batch=s.max_batch,
      lora_params=lora_lib.count_params(lora), before=before, after=after,
      first_round_seconds=compile_s, wall_seconds=time.time() - t_start,
      poisson_overflows=sampler.overflows, noise_key_source=key_source,
      a_frozen=a_frozen)
  summary["resumed_from_round"] = start if meta is not None else None
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  return summary | {"_lora": lora, "_state": state, "_setup": s}


format_summary = report.format_summary
