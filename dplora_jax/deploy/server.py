"""The coordinator of a deployed federation: the simulation's server half, over a transport.

`serve` runs the rounds of a config against institutions' clients reached through a `Transport`
(`deploy.flower.FlowerTransport` in a deployment; an in-process one in tests). Per round it:
samples clients with its own secret randomness (Poisson, rate p: `DPRandomness.clients`), sends
the global LoRA to the sampled clients it can reach, collects their replies within a timeout,
and applies `federated.round.server_update`, the very function the one-program round applies.

- The divisor is fixed before anyone replies (FedAvg: the number of sampled clients; client-level
  DP: the public p K), so a client that dropped out or refused is a non-contribution: it lowers
  the update, never changes the divisor or the sensitivity.
- Under client-level DP the server clips every received update to S itself (`ClientDP.clip`,
  idempotent on an update the client already clipped), so the sensitivity holds whatever a
  client sends, then adds the noise (`ClientDP.release`) with its own secret key.
- Its ledger is the plan's client-level ledger (and, for the report, the plan's example-level
  bound, which each client's own ledger enforces); a budget guard stops before overspending.
- State (LoRA, server optimizer, S, rounds, the randomness root, the run id) is checkpointed
  with orbax every round; a restarted server resumes from the newest checkpoint. Clients that
  already trained the resumed round recompute the same release from the same global model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dplora_jax import build as build_lib, checkpoint as ckpt_lib, config as config_lib
from dplora_jax import export as export_lib, lora as lora_lib, peft, report, tasks
from dplora_jax import workdir as workdir_lib
from dplora_jax.deploy import protocol
from dplora_jax.dp import release, sampling
from dplora_jax.dp.randomness import DPRandomness
from dplora_jax.federated import aggregation, round as round_lib
from dplora_jax.metrics import Communication, JsonlWriter, TensorBoardWriter, tree_bytes
from dplora_jax.tasks.scoring import ModelParts



class Transport(Protocol):
  """How the server reaches clients (node ids are the transport's, client ids the config's)."""

  def node_ids(self) -> list[int]:
    ...

  def send(self, kind: str, messages: dict[int, dict], timeout: float) -> dict[int, dict | None]:
    """Sends one message per node; returns each node's reply, None for no (or a failed) reply."""
    ...


@dataclasses.dataclass(frozen=True)
class ServerSettings:
  """How the coordinator runs (not part of the privacy config).

  Attributes:
    workdir: owner-only directory for checkpoints, metrics, summary and the adapter.
    round_timeout: seconds to wait for the sampled clients' replies.
    wait_for_clients: seconds to wait at start until all K clients have said hello.
    export: write the final adapter to WORKDIR/adapter (PEFT format).
    evaluate: evaluate the global LoRA on the public held-out set before and after.
  """
  workdir: str
  round_timeout: float = 600.0
  wait_for_clients: float = 120.0
  export: bool = True
  evaluate: bool = True


@dataclasses.dataclass
class ServeResult:
  """What `serve` returns: the summary (also WORKDIR/summary.json) and the final round state."""
  summary: dict
  state: round_lib.RoundState


class DeploymentStopped(RuntimeError):
  """The run cannot continue (every client is out of budget, or none is reachable)."""


class _Clients:
  """client id <-> node id, learnt from hello replies (a restarted node gets a new node id)."""

  def __init__(self, transport: Transport, hello: dict, k: int, log: Callable):
    self.transport, self.hello, self.k, self.log = transport, hello, k, log
    self.node_of: dict[int, int] = {}
    self.refused: dict[int, str] = {}  # node id -> why it refused the run

  def discover(self, timeout: float):
    live = set(self.transport.node_ids())
    self.node_of = {c: n for c, n in self.node_of.items() if n in live}
    new = sorted(live - set(self.node_of.values()) - set(self.refused))
    if not new:
      return
    replies = self.transport.send(protocol.HELLO, {n: self.hello for n in new}, timeout)
    for n, rep in replies.items():
      if rep is None:
        continue
      c = protocol.check(protocol.HELLO, rep, reply=True)["config"]
      cid = int(c["client_id"])
      if c["status"] != protocol.OK:
        self.refused[n] = c["reason"]
        self.log(f"node {n} (client {cid}) refused the run: {c['reason']}")
      elif not 0 <= cid < self.k:
        self.refused[n] = f"client id {cid} outside 0..{self.k - 1}"
        self.log(f"node {n}: client id {cid} is not in this federation of {self.k}; ignored")
      elif cid in self.node_of and self.node_of[cid] != n:
        self.log(f"node {n} claims client {cid}, already held by node {self.node_of[cid]}; "
                 "ignored")
      else:
        self.node_of[cid] = n
        self.log(f"client {cid} joined (node {n}, dplora_jax {c['dplora_version']})")


def serve(cfg: config_lib.RunConfig, transport: Transport, settings: ServerSettings,
          log: Callable[[str], None] = print) -> ServeResult:
  """Runs (or resumes) the federation.

  Raises:
    ValueError: a config the deployment does not support.
    DeploymentStopped: every client is out of budget, or no client ever joined.
    RuntimeError: the server's client-level budget guard fired.
  """
  t_start = time.time()
  protocol.check_deployable(cfg)
  workdir = settings.workdir
  workdir_lib.make_private_dir(workdir)
  with workdir_lib.WorkdirLock(workdir):
    ckpt = ckpt_lib.Checkpointer(workdir, cfg.checkpoint_keep)
    try:
      return _serve(cfg, transport, settings, log, ckpt, t_start)
    finally:
      ckpt.close()


def _serve(cfg, transport, settings, log, ckpt, t_start):
  k, workdir = cfg.fed.num_clients, settings.workdir
  plan = build_lib.privacy_plan(cfg)
  model, tok, fingerprint, model_path = build_lib.load_base(cfg)
  full_model_bytes = tree_bytes(jax.tree.leaves(model))
  build_lib.attach_lora(model, cfg, tok)
  factor_bytes = lora_lib.factor_bytes(model)
  graphdef, lora, frozen = lora_lib.split(model)
  server_tx = round_lib.server_optimizer(cfg.fed)
  state = round_lib.init_state(lora, server_tx, cfg.dp.client_clip_norm)
  a_frozen = build_lib.effective_lora(cfg).freeze_a
  comm = Communication(lora_lib.nbytes(lora), full_model_bytes,
                       setup_down=factor_bytes["a"] * k if a_frozen else 0)
  cfg_dict = config_lib.to_dict(cfg)

  latest = ckpt.latest()
  meta = None
  if latest is not None:
    meta = ckpt.read_meta(latest)
    path = os.path.join(ckpt.directory, str(latest))
    ckpt_lib.check_resumable(meta, cfg, fingerprint, path)
    tree = ckpt.restore_state(latest, ckpt_lib.state_tree(state))
    state = ckpt_lib.restored_round_state(tree, round_lib.RoundState)
    host = meta["host"]
    randomness = DPRandomness.from_state(host["randomness"])
    rounds_done, run_id = int(host["rounds_done"]), meta["deploy"]["run_id"]
    comm.up_total, comm.down_total = host["comm"]["up_total"], host["comm"]["down_total"]
    ckpt_lib.check_ledger(meta, plan.ledger(rounds_done), path)
    log(f"resuming run {run_id} after round {rounds_done} from {path}")
  else:
    randomness = DPRandomness(cfg.dp.reproducible_seed)
    rounds_done, run_id = 0, uuid.uuid4().hex
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  if meta is not None:
    writer.drop_after(rounds_done)
  else:
    writer.reset()

  tb = TensorBoardWriter(workdir)
  items = build_lib.eval_items(cfg) if settings.evaluate else []
  task = tasks.get(cfg.data.task)

  def evaluate(lora_tree):
    if not settings.evaluate:
      return {}
    return task.evaluate(ModelParts(graphdef, jax.device_get(lora_tree), frozen), tok, items,
                         cfg.data)

  # the initial LoRA's evaluation (deterministic) is kept in the checkpoint, not redone on resume
  before = meta["deploy"].get("before") if meta is not None else None
  if before is None:
    before = evaluate(lora)
  hello = protocol.instruction(protocol.HELLO, run_id=run_id, config=cfg_dict,
                               model_fingerprint=fingerprint)
  clients = _Clients(transport, hello, k, log)
  deadline = time.time() + settings.wait_for_clients
  while True:
    clients.discover(settings.round_timeout)
    if len(clients.node_of) == k or time.time() > deadline:
      break
    time.sleep(1.0)
  if not clients.node_of:
    raise DeploymentStopped(f"no client joined within {settings.wait_for_clients:.0f} s "
                            f"(refusals: {clients.refused or 'none'}).")
  log(f"{len(clients.node_of)} of {k} clients joined: {sorted(clients.node_of)}")

  step = jax.jit(_server_step(server_tx, plan.server, cfg.lora.first_layer), donate_argnums=(0,))
  like = jax.tree.map(np.asarray, lora)
  zeros = jax.tree.map(lambda x: np.zeros((k,) + x.shape, np.float32), like)
  exhausted: set[int] = set()
  ledger = plan.ledger(rounds_done)
  public_participation = release.participation_is_public(cfg.dp.mode)
  client_eps: dict[int, float] = {}
  first_round_s = None
  stopped = None
  for r in range(rounds_done, cfg.fed.rounds):
    nxt_ledger = plan.ledger(r + 1)
    nxt = nxt_ledger.epsilons()
    server_mech = plan.get("client")
    if server_mech and nxt["client"] > server_mech.epsilon * (1 + 1e-9):
      raise RuntimeError(f"budget guard: round {r + 1} would spend client-level "
                         f"eps={nxt['client']:.4f} beyond the planned {server_mech.epsilon:.4f}.")
    t0 = time.time()
    clients.discover(settings.round_timeout)
    sampled = np.flatnonzero(sampling.sample_clients(randomness.clients(r), k,
                                                     cfg.fed.client_rate))
    lora_arrays = protocol.lora_to_arrays(jax.device_get(state.lora))
    msg = protocol.instruction(protocol.TRAIN, run_id=run_id, config=cfg_dict,
                               model_fingerprint=fingerprint, round_=r,
                               client_clip=float(state.client_clip), lora=lora_arrays)
    reach = {int(c): clients.node_of[int(c)] for c in sampled if int(c) in clients.node_of}
    replies = transport.send(protocol.TRAIN, {n: msg for n in reach.values()},
                             settings.round_timeout) if reach else {}
    rows = jax.tree.map(np.copy, zeros)
    take = np.zeros((k,), bool)
    dropped, refused = [], []
    for cid, node in sorted(reach.items()):
      rep = replies.get(node)
      if rep is None:
        dropped.append(cid)
        continue
      try:
        c = protocol.check(protocol.TRAIN, rep, reply=True)["config"]
        if int(c["client_id"]) != cid or (c["status"] == protocol.OK and int(c["round"]) != r):
          raise protocol.ProtocolError(f"reply names client {c['client_id']} round {c['round']}")
        if c["status"] != protocol.OK:
          refused.append(cid)
          log(f"round {r + 1}: client {cid} refused: {c['reason']}")
          if c["reason"].startswith("privacy budget"):
            exhausted.add(cid)
          continue
        delta = protocol.arrays_to_lora(rep["arrays"], like)
      except protocol.ProtocolError as e:
        refused.append(cid)
        log(f"round {r + 1}: client {cid}'s reply was rejected: {e}")
        continue
      exhausted.discard(cid)
      client_eps[cid] = float(c["epsilon"])
      for row, leaf in zip(jax.tree.leaves(rows), jax.tree.leaves(delta)):
        row[cid] = leaf
      take[cid] = True
    dropped += [int(c) for c in sampled if int(c) not in reach]
    if dropped:
      log(f"round {r + 1}: no reply from client(s) {sorted(dropped)}: counted as non-contributions")
    if clients.node_of and set(clients.node_of) <= exhausted:
      stopped = (f"every client is out of privacy budget (clients {sorted(exhausted)} refused); "
                 f"stopped before round {r + 1}")
      log(stopped)
      break
    # the divisor is fixed before any reply: the sampled clients (FedAvg) or p K (client DP)
    weight = jnp.float32(len(sampled))
    _, server_key = round_lib.round_keys(randomness.noise_key, jnp.int32(r))
    state, public = step(state, rows, jnp.asarray(take), weight, server_key)
    public = jax.device_get(public)
    if not bool(public["lora_finite"]):
      raise FloatingPointError(f"guard: round {r + 1} produced a non-finite global LoRA.")
    participants = int(take.sum())
    seconds = time.time() - t0
    first_round_s = first_round_s or seconds
    ledger = nxt_ledger
    up, down = comm.record_round(participants)
    exp_bytes = comm.expected_round_bytes(cfg.fed.client_rate * k)
    record = release.round_record(cfg.dp.mode, r + 1, nxt, dict(public, participants=participants),
                                  up, down, exp_bytes, exp_bytes)
    if public_participation:
      record |= {"sampled": int(len(sampled)), "dropped": len(dropped), "refused": len(refused)}
    writer.write(record)
    tb.write(record)
    rounds_done = r + 1
    ckpt.save(rounds_done, state, {
        "config": cfg_dict, "model": {"path": model_path, "fingerprint": fingerprint},
        "ledger": ledger.to_dict(), "deploy": {"run_id": run_id, "before": before},
        "host": {"rounds_done": rounds_done, "randomness": randomness.state(),
                 "comm": {"up_total": comm.up_total, "down_total": comm.down_total}}})
    log(f"round {r + 1}/{cfg.fed.rounds}: {participants} of {len(sampled)} sampled clients "
        f"contributed, eps {record['epsilon']:.3f}, {seconds:.1f} s")

  tb.close()
  workdir_lib.restrict_tree(tb.logdir)
  after = evaluate(state.lora)
  summary = report.summary(
      cfg, plan, ledger, comm, devices=0, max_batch=plan.max_batch,
      lora_params=lora_lib.trained_params(state.lora, cfg.lora.first_layer), before=before, after=after,
      first_round_seconds=first_round_s, wall_seconds=time.time() - t_start,
      randomness_source=randomness.source, a_frozen=a_frozen)
  summary["deployment"] = {
      "runtime": "flower", "run_id": run_id, "rounds_done": rounds_done,
      "stopped": stopped, "clients_joined": sorted(clients.node_of),
      "client_reported_epsilon": ({str(c): e for c, e in sorted(client_eps.items())}
                                  if public_participation else None),
      "note": ("example-level eps is each client's own ledger (its max-epsilon guards it); the "
               "value above is the plan's, i.e. a client that trained every round.")}
  summary["resumed_from_round"] = int(meta["host"]["rounds_done"]) if meta else None
  if settings.export and rounds_done:
    out = os.path.join(workdir, "adapter")
    trained = lora_lib.merge(graphdef, jax.device_get(state.lora), frozen)
    meta_out = {"ledger": ledger.to_dict(), "model": {"path": model_path,
                                                     "fingerprint": fingerprint}}
    peft.export_adapter(trained, build_lib.effective_lora(cfg), out, base_model=model_path,
                        readme=export_lib.privacy_readme(cfg, meta_out), ledger=meta_out["ledger"])
    summary["adapter"] = out
  with workdir_lib.private_open(os.path.join(workdir, "summary.json")) as f:
    json.dump(summary, f, indent=2, default=float)
  return ServeResult(summary, state)


def _server_step(server_tx, client_dp, first_layer: int = 0):
  """(state, rows [K, ...], take [K], weight, server key) -> (new state, public): the sum of the
  updates received (under client-level DP each (re)clipped to S first, `ClientDP.clip`), then
  `round.server_update`, the simulation's server half. Adaptive S is not deployable, so there is
  no count."""
  def step(state, rows, take, weight, server_key):
    if client_dp is None:
      summed = aggregation.weighted_sum(rows, take.astype(jnp.float32))
    else:
      summed, _, _ = client_dp.clip(rows, take, state.client_clip)
    return round_lib.server_update(server_tx, client_dp, state, summed, weight, None, server_key,
                                   first_layer)
  return step
