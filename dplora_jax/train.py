"""The run loop: train the rounds of a built run, evaluate, report.

The host only prepares each round's samples (indices, masks, weights, all from the run's secret
`dp.randomness`) and logs what `dp.release` allows; every round is one call of the compiled SPMD
`round_step`. Building (model, data, clients, privacy plan) is `dplora_jax.build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dplora_jax import build as build_lib, checkpoint as ckpt_lib, report, workdir as workdir_lib
from dplora_jax import distributed, prefix_cache
from dplora_jax import config as config_lib, lora as lora_lib
from dplora_jax.config import RunConfig
from dplora_jax.data import buckets as buckets_lib
from dplora_jax.dp import release
from dplora_jax.federated import centre as centre_lib, round as round_lib
from dplora_jax.dp.randomness import DPRandomness
from dplora_jax.host_state import HostState
from dplora_jax.metrics import Communication, JsonlWriter, TensorBoardWriter
from dplora_jax.models import sliced as sliced_lib


@dataclasses.dataclass
class RunResult:
  """What `run` returns.

  Attributes:
    summary: the JSON-serialisable report (also written to workdir/summary.json).
    lora: the final global LoRA pytree.
    state: the final round state (LoRA, server optimizer, S, round).
    setup: the built run (model parts, clients, plan).
    host: the host state (secret randomness, samplers, communication).
  """
  summary: dict
  lora: Any
  state: Any
  setup: build_lib.Setup
  host: HostState


def _stack_clients(clients, num_slots: int, rows=None):
  """dict of [num_slots, n_max, T] arrays (padding clients and rows are zeros). Only the slots in
  `rows` (default: all) are filled: the others stay untouched zero pages, never resident, so a
  process of a multi-process run holds only its own clients' examples."""
  n_max = max(len(c) for c in clients)
  t = clients[0].tokens.shape[1]
  out = {k: np.zeros((num_slots, n_max, t), getattr(clients[0], k).dtype)
         for k in ("tokens", "mask", "targets", "loss_mask")}
  for i in (range(len(clients)) if rows is None else rows):
    if i < len(clients):
      for k in out:
        out[k][i, :len(clients[i])] = getattr(clients[i], k)
  return out


def _check_workdir(workdir: str):
  try:
    workdir_lib.make_private_dir(workdir)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another "
                          "--workdir.") from e


def _check_replicated_root(randomness: DPRandomness):
  distributed.assert_replicated(np.frombuffer(randomness.digest(), np.uint8),
                                "the DP randomness root")


def run(cfg: RunConfig, workdir: str, *, progress: bool = True,
        extra_train: list | None = None) -> RunResult:
  """Trains `cfg`, or resumes it from the newest checkpoint in `workdir`.

  Writes workdir/metrics.jsonl, workdir/tensorboard/, workdir/checkpoints/ (every
  cfg.checkpoint_every rounds and after the last) and workdir/summary.json; the workdir is
  owner-only and held by this run (a lock file) until it returns.

  Raises:
    RuntimeError: a guard fired (LoRA did not move in round 1; the budget would be exceeded).
    FloatingPointError: a round produced a non-finite LoRA.
    CheckpointError: the workdir holds a checkpoint of a different run, or a damaged one.
    PermissionError: the workdir is not writable.
    WorkdirLocked: another live run holds the workdir.
  """
  t_start = time.time()
  main = distributed.is_main()
  if main:
    _check_workdir(workdir)
  # one lock per run: process 0's (the other processes of a multi-process run follow it)
  with workdir_lib.WorkdirLock(workdir) if main else contextlib.nullcontext():
    ckpt = (ckpt_lib.Checkpointer(workdir, cfg.checkpoint_keep, primary=main)
            if cfg.checkpoint_every else None)
    try:
      return _run(cfg, workdir, progress, extra_train, ckpt, t_start)
    finally:
      if ckpt:
        ckpt.close()


def _run(cfg, workdir, progress, extra_train, ckpt, t_start):
  resume_round = ckpt.latest() if ckpt else None
  meta = None
  if resume_round is not None:  # refuse a different run before loading anything
    meta = ckpt.read_meta(resume_round)
    ckpt_lib.check_resumable(meta, cfg, path=os.path.join(ckpt.directory, str(resume_round)))
  # one run, one randomness: process 0's root in every process, checked before anything is
  # built (a resumed run reads the same checkpoint everywhere; checked again below)
  randomness = DPRandomness(cfg.dp.reproducible_seed).with_root(distributed.share_root)
  _check_replicated_root(randomness)
  # frozen weights split over fsdp: read by slices straight onto the mesh (no host holds the model)
  sliced = cfg.mesh.fsdp > 1 and not cfg.model.random_init
  s = build_lib.build(cfg, extra_train, abstract_frozen=sliced)
  if meta is not None:
    ckpt_lib.check_resumable(meta, cfg, s.fingerprint,
                             os.path.join(ckpt.directory, str(resume_round)))
  k = cfg.fed.num_clients
  main = distributed.is_main()
  fsdp = cfg.mesh.fsdp
  if jax.device_count() % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {jax.device_count()} devices.")
  # many processes: every device takes part (each process must own a part of the mesh)
  groups = jax.device_count() // fsdp
  mesh = round_lib.make_mesh(fsdp * (groups if distributed.multi_process() else min(groups, k)),
                             fsdp)
  n_dev = mesh.devices.size
  n_groups = mesh.shape[round_lib.AXIS]
  slots = int(math.ceil(k / n_groups) * n_groups)
  plan = s.plan
  spec, server_tx, round_step = round_lib.run_round_step(cfg, plan, s.graphdef, s.loss_positions,
                                                        mesh, s.label_tokens)

  owned = distributed.owned_rows(round_lib.client_sharding(mesh), slots)
  stacked = _stack_clients(s.clients, slots, owned)
  if cfg.lora.first_layer and cfg.model.cache_prefix and not sliced:
    t0 = time.time()
    stacked["hidden"], source = prefix_cache.load_or_compute(s, stacked, owned,
                                                             cfg.model.prefix_cache_dir)
    if progress and main:
      print(prefix_cache.progress_line(cfg.lora.first_layer, source, stacked["hidden"],
                                       time.time() - t0), flush=True)
  if cfg.lora.centre != "none":  # before anything evaluates or trains: part of the model
    centre_lib.ensure(cfg, s, stacked, randomness.centre_key, workdir, main, progress,
                      resumed=meta is not None)
  data = round_lib.shard_clients(mesh, stacked)
  del stacked
  client_ids = round_lib.shard_clients(mesh, np.arange(slots, dtype=np.int32))
  if sliced:
    s.frozen = frozen = sliced_lib.place_frozen(s.weights, s.frozen,
                                                round_lib.frozen_shardings(mesh, s.frozen))
    if progress:  # every process: what it read is its own devices' share
      print(f"[process {jax.process_index()}] frozen weights read by slices: "
            f"{report.human_bytes(s.weights.bytes_read)} of "
            f"{report.human_bytes(s.weights.total_bytes())} (float32)", flush=True)
  else:
    frozen = distributed.place(round_lib.frozen_shardings(mesh, s.frozen), s.frozen)
  state = round_lib.replicate(mesh, round_lib.init_state(s.lora, server_tx,
                                                         cfg.dp.client_clip_norm))
  sizes = [len(c) for c in s.clients]  # private: feed only the weights of dp.mode none
  base_w = np.asarray(sizes if cfg.fed.weighting == "examples" else [1] * k, np.float32)
  # FFA: A is part of the frozen tree, sent to every client once before round 1, never again.
  a_frozen = build_lib.effective_lora(cfg).freeze_a
  comm = Communication(lora_lib.nbytes(s.lora), s.full_model_bytes,
                       setup_down=s.factor_bytes["a"] * k if a_frozen else 0)
  host = HostState.create(cfg, s, comm, randomness)
  # only process 0 writes what the run releases; the others discard it
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl") if main else os.devnull)
  if meta is not None:
    tree = ckpt.restore_state(resume_round, ckpt_lib.state_tree(state))
    state = round_lib.replicate(mesh, ckpt_lib.restored_round_state(tree, round_lib.RoundState))
    host.restore(meta["host"])
    ckpt_lib.check_ledger(meta, plan.ledger(host.rounds_done),
                          os.path.join(ckpt.directory, str(resume_round)))
    if main:
      writer.drop_after(host.rounds_done)
  elif main:
    writer.reset()
  _check_replicated_root(host.randomness)
  start = host.rounds_done
  tb = TensorBoardWriter(workdir) if main else None
  noise_key = host.randomness.noise_key
  cfg_dict = config_lib.to_dict(cfg)

  def save(ledger):
    ckpt.save(host.rounds_done, state, {
        "config": cfg_dict, "model": {"path": s.model_path, "fingerprint": s.fingerprint},
        "ledger": ledger.to_dict(), "host": host.to_dict()})

  # the frozen weights may span processes (sliced): then every process takes part, main reports
  evaluate = (build_lib.evaluate if main or (sliced and distributed.multi_process())
              else lambda *_: {})
  before = evaluate(s, s.lora)
  initial = jax.tree.map(np.asarray, s.lora)
  expected = cfg.fed.client_rate * k
  # the public noise norm sigma C sqrt(d) / B (only the private_diagnostics ratio uses it); with
  # the aggregator noising (dp.noise_at='server') that of the average over the expected clients
  noise_norm = (plan.dpsgd.noise_multiplier * plan.dpsgd.clip_norm
                * math.sqrt(lora_lib.trained_params(s.lora, cfg.lora.first_layer))
                / plan.dpsgd.divisor / (expected if plan.central is not None else 1.0)
                if plan.dpsgd is not None else None)
  lengths = [c.mask.sum(1) for c in s.clients]  # private: only to pick compute buckets
  n_micro = s.max_batch // cfg.optim.microbatch_size

  def place(idx, valid, weights, bucket):
    return [round_lib.shard_clients(mesh, a) for a in (idx, valid, weights, bucket)]

  # Ahead of time: every bucket's branch is compiled into this one program before round 1.
  t0 = time.time()
  shape = (slots, cfg.fed.local_steps, s.max_batch)
  full_length = np.zeros(shape[:2] + (n_micro,), np.int32)  # bucket 0 of one bucket: max_length
  z_idx, z_valid, z_w, z_bucket = place(np.zeros(shape, np.int32), np.zeros(shape, bool),
                                        np.zeros((slots,), np.float32), full_length)
  compiled = round_step.lower(state, frozen, data, z_idx, z_valid, z_w, client_ids, noise_key,
                              z_bucket).compile()
  compile_s = time.time() - t0
  first_round_s = None
  last_eval = None
  ledger = plan.ledger(start)  # one Ledger per round: its eps are computed once
  bar = tqdm(range(start, cfg.fed.rounds), desc="rounds", disable=not (progress and main),
             initial=start, total=cfg.fed.rounds)
  for r in bar:
    nxt_ledger = plan.ledger(r + 1)
    nxt = nxt_ledger.epsilons()
    for m in plan.mechanisms:
      if nxt[m.name] > m.epsilon * (1 + 1e-9):
        raise RuntimeError(f"budget guard: round {r + 1} would spend eps={nxt[m.name]:.4f} "
                           f"({m.name}-level) beyond the planned {m.epsilon:.4f}.")
    t0 = time.time()
    part, idx, valid = host.sample_round(cfg, slots, r)
    weights = np.zeros((slots,), np.float32)
    weights[:k] = base_w * part
    if len(spec.buckets) > 1:
      idx, valid = buckets_lib.order_by_length(idx, valid, lengths)
      bucket = buckets_lib.microbatch_buckets(idx, valid, lengths, spec.buckets, spec.microbatch)
    else:
      bucket = full_length
    p_idx, p_valid, p_w, p_bucket = place(idx, valid, weights, bucket)
    state, metrics = compiled(state, frozen, data, p_idx, p_valid, p_w, client_ids, noise_key,
                              p_bucket)
    metrics = jax.device_get(metrics)
    public, diagnostics = metrics["public"], metrics["diagnostics"]
    seconds = time.time() - t0
    if not bool(public["lora_finite"]):
      raise FloatingPointError(f"guard: round {r + 1} produced a non-finite update (the global "
                               "LoRA is not finite); stopping.")
    if first_round_s is None:
      first_round_s = seconds
      if r == 0:
        moved = any(not np.array_equal(a, np.asarray(b)) for a, b in
                    zip(jax.tree.leaves(initial), jax.tree.leaves(state.lora)))
        if not moved and public["participants"] > 0:
          raise RuntimeError("guard: the LoRA weights did not move in round 1 (learning rate 0, "
                             "or every update was zero); refusing to spend privacy on nothing.")
    ledger = nxt_ledger
    host.rounds_done = r + 1
    up, down = comm.record_round(int(public["participants"]))
    diag = None
    if cfg.private_diagnostics:
      diag = dict(diagnostics, seconds=seconds)
      if noise_norm is not None:
        diag["noise_to_signal"] = noise_norm / max(float(diagnostics["signal_norm"]), 1e-12)
    exp_bytes = comm.expected_round_bytes(expected)
    record = release.round_record(cfg.dp.mode, r + 1, nxt, public, up, down, exp_bytes,
                                  exp_bytes, diag)
    distributed.assert_replicated(state.lora, f"the global LoRA after round {r + 1}")
    if cfg.eval_every and (r + 1) % cfg.eval_every == 0:  # the released LoRA, public data
      record["eval"] = last_eval = evaluate(s, state.lora)
    if main and ((r + 1) % cfg.log_every == 0 or r + 1 == cfg.fed.rounds):
      writer.write(record)
      tb.write(record)
    if ckpt and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.fed.rounds):
      save(ledger)
    post = {"eps": f"{record['epsilon']:.2f}"}
    if diag:
      post["private_loss"] = f"{diag['loss']:.3f}"
    bar.set_postfix(**post)
  if tb is not None:
    tb.close()

  lora = state.lora
  # the last round's eval_every evaluation is already the "after" one
  after = (last_eval if cfg.eval_every and cfg.fed.rounds % cfg.eval_every == 0
           and last_eval is not None else evaluate(s, lora))
  summary = report.summary(
      cfg, plan, ledger, comm, devices=n_dev, max_batch=s.max_batch,
      lora_params=lora_lib.trained_params(lora, cfg.lora.first_layer), before=before, after=after,
      first_round_seconds=first_round_s, compile_seconds=compile_s, wall_seconds=time.time() - t_start,
      randomness_source=host.randomness.source, a_frozen=a_frozen,
      diagnostics=({"overflows": host.sampler.overflows} if cfg.private_diagnostics else None))
  summary["resumed_from_round"] = start if meta is not None else None
  summary["processes"] = jax.process_count()
  if main:
    with workdir_lib.private_open(os.path.join(workdir, "summary.json")) as f:
      json.dump(summary, f, indent=2, default=float)
    # only what this run wrote: never files of the user's that happen to sit in the workdir
    workdir_lib.restrict_tree(tb.logdir)
  return RunResult(summary, lora, state, s, host)


format_summary = report.format_summary
