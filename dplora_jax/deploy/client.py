"""One institution's client: the simulation's client step, on its own data, behind its own guard.

`InstitutionClient` answers the server's messages (`deploy.protocol`). For a train message it
rebuilds the run from the public config the server sent, with what only the institution decides
(node config): its data file, its model file, its state directory, its own privacy budget and
what it trusts the server with. Then it runs exactly the simulation's client step
(`federated.client.local_train`, per-example DP-SGD) with noise and samples from its own secret
randomness, records the round in its ledger, and returns only the update.

Guards (each refusal is a reply the server logs, never a silent skip):
- the base model's fingerprint must equal the server's;
- the config must protect its examples (dp.mode sample or sample+client) unless the node sets
  `trust-server=true`; a reproducible seed (public randomness) is refused unless the node sets
  `allow-reproducible-seed=true` (a server that picked the seed could regenerate the noise);
- its data must fit the public bound `data.max_client_size` (the reply never states its size);
- it reads only paths it chose: its data file, and its model (`model-path`, or a packaged alias);
  a config naming other local paths (`model.path`, `lora.init_from`) is refused, and errors
  that could quote its records stay in its own log;
- its example-level ledger, over every run on this data, must stay within `max-epsilon`;
- a round it already trained is recomputed only from the same instruction (global model, config,
  S: then the reply is bitwise the same release, at no extra cost); from another it is refused,
  since reusing the round's noise on a different input would let the difference of the two
  replies cancel it. Each run draws from its own child of the client's root, so no two runs share
  noise or samples either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dplora_jax
from dplora_jax import build as build_lib, config as config_lib, lora as lora_lib, tasks
from dplora_jax import workdir as workdir_lib
from dplora_jax.data import buckets as buckets_lib
from dplora_jax.deploy import protocol
from dplora_jax.deploy.client_state import ClientState, mechanism_record
from dplora_jax.dp import sampling
from dplora_jax.federated import client as client_lib, round as round_lib
from dplora_jax.models import ALIASES

SAFE_MODES = ("sample", "sample+client")  # modes whose release protects the client's examples


class OverBound(ValueError):
  """The node's data exceeds the public size bound (the reply does not say by how much)."""


@dataclasses.dataclass(frozen=True)
class NodeSettings:
  """What the institution decides (Flower node config; `--node-config 'k=v ...'`).

  Attributes:
    client_id: this institution's index in the federation (`partition-id`; public).
    data_path: its training data file (`data-path`), in the task's format.
    state_dir: its private state directory (`state-dir`): randomness root, ledger, caches.
    max_epsilon: its own example-level budget over every run on this data (`max-epsilon`).
    model_path: its copy of the base model (`model-path`; "" = the config's model.path).
    trust_server: accept configs whose release does not protect examples (`trust-server`).
    allow_reproducible_seed: accept dp.reproducible_seed >= 0 (`allow-reproducible-seed`; tests).
  """
  client_id: int
  data_path: str
  state_dir: str
  max_epsilon: float
  model_path: str = ""
  trust_server: bool = False
  allow_reproducible_seed: bool = False

  @classmethod
  def from_node_config(cls, nc: dict) -> "NodeSettings":
    """Parses a Flower node config.

    Raises:
      ValueError: a missing or malformed key, named.
    """
    def need(key):
      if key not in nc or nc[key] in ("", None):
        raise ValueError(f"node config: '{key}' is required (flower-supernode --node-config "
                         "'partition-id=0 data-path=\"...\" state-dir=\"...\" max-epsilon=8').")
      return nc[key]

    def flag(key):
      v = nc.get(key, False)
      if isinstance(v, str):
        if v.lower() not in ("true", "false"):
          raise ValueError(f"node config: '{key}'={v!r}; expected true or false.")
        return v.lower() == "true"
      return bool(v)

    try:
      cid, budget = int(need("partition-id")), float(need("max-epsilon"))
    except (TypeError, ValueError) as e:
      raise ValueError(f"node config: partition-id must be an integer and max-epsilon a number "
                       f"({e}).") from e
    if cid < 0 or not budget > 0:
      raise ValueError(f"node config: partition-id={cid} must be >= 0 and max-epsilon={budget} "
                       "> 0.")
    return cls(cid, str(need("data-path")), str(need("state-dir")), budget,
               str(nc.get("model-path", "") or ""), flag("trust-server"),
               flag("allow-reproducible-seed"))


def client_config(config: dict, node: NodeSettings) -> config_lib.RunConfig:
  """The run's public config with the institution's own data and model paths."""
  d = json.loads(json.dumps(config))
  d["data"]["train_file"] = node.data_path
  if node.model_path:
    d["model"]["path"] = node.model_path
  return config_lib.from_config_dict(d)


@dataclasses.dataclass
class _Run:
  """Everything a train message needs, built once per (process, run)."""
  cfg: config_lib.RunConfig
  fingerprint: str
  lora: object
  frozen: object
  data: dict
  lengths: np.ndarray
  sampler: sampling.PoissonSampler
  spec: client_lib.ClientSpec
  plan: object
  train: object  # jitted local_train(lora, frozen, data, idx, valid, key, bucket)
  client_dp: object


@functools.lru_cache(maxsize=8)
def _local_train(graphdef, spec, optimizer: str, lr: float, weight_decay: float):
  """The jitted client step (shared by the clients of one process: compiled once)."""
  tx = client_lib.make_client_optimizer(optimizer, lr, weight_decay)
  return jax.jit(functools.partial(client_lib.local_train, graphdef, spec, tx))


class InstitutionClient:
  """Answers hello and train messages for one institution (see the module docstring)."""

  def __init__(self, node: NodeSettings):
    self.node = node
    self.state = ClientState(node.state_dir)
    self._runs: dict[str, _Run] = {}

  def use_compilation_cache(self):
    """Keeps compiled programs in the state directory (process-wide: for a ClientApp, which runs
    in a fresh process per message, so only its first round compiles). A cache the operator set
    in the environment (JAX_COMPILATION_CACHE_DIR) is used instead. Compiled programs depend on
    the public configuration's shapes only, never on the data."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not cache:
      cache = os.path.join(self.state.dir, "jax_cache")
      workdir_lib.make_private_dir(cache)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  # -- messages ----------------------------------------------------------------------------

  def handle(self, kind: str, message: dict) -> dict:
    """The reply to one server message (never raises for a refusal: it replies one)."""
    message = protocol.check(kind, message, reply=False)
    c = message["config"]
    try:
      cfg = client_config(json.loads(c["config"]), self.node)
    except (ValueError, KeyError, TypeError) as e:
      return protocol.refusal(kind, self.node.client_id, f"bad config from the server: {e}")
    reason = self._policy(cfg)
    if reason:
      return protocol.refusal(kind, self.node.client_id, reason)
    try:  # hello: the cheap checks only (no weights read); train: the whole run
      run = self._run(c["run_id"], cfg) if kind == protocol.TRAIN else None
      fingerprint = run.fingerprint if run else build_lib.base_fingerprint(cfg)
    except OverBound as e:
      return protocol.refusal(kind, self.node.client_id, str(e))
    except (ValueError, FileNotFoundError, OSError) as e:
      # the details may quote private records (a bad label, a line) or local paths: they stay in
      # this node's own log; the server learns only that the run cannot be built here
      print(f"[dplora client {self.node.client_id}] cannot build the run: {e}", file=sys.stderr)
      return protocol.refusal(kind, self.node.client_id,
                              "cannot build the run on this node (details in its own log)")
    if fingerprint != c["model_fingerprint"]:
      return protocol.refusal(
          kind, self.node.client_id, f"base model mismatch: this node's model has fingerprint "
          f"{fingerprint[:16]}..., the server's {c['model_fingerprint'][:16]}...")
    if kind == protocol.HELLO:
      return protocol.reply(kind, client_id=self.node.client_id, status=protocol.OK, reason="",
                            dplora_version=dplora_jax.__version__)
    return self._train(c["run_id"], run, int(c["round"]), float(c["client_clip"]),
                       message["arrays"], protocol.instruction_digest(message))

  def _policy(self, cfg) -> str:
    """Why this institution refuses the config, or ''."""
    dp = cfg.dp
    if dp.mode not in SAFE_MODES and not self.node.trust_server:
      return (f"dp.mode={dp.mode!r} does not protect this client's examples from the server; "
              "this node accepts only sample or sample+client (node config trust-server=true "
              "to allow it)")
    if dp.reproducible_seed >= 0 and not self.node.allow_reproducible_seed:
      return (f"dp.reproducible_seed={dp.reproducible_seed}: the noise would be regenerable by "
              "whoever knows the config; refused (node config allow-reproducible-seed=true for "
              "tests)")
    if cfg.lora.init_from and not self.node.trust_server:
      return ("lora.init_from names a path on this node; the starting model is the global LoRA "
              "the server sends")
    if not cfg.model.random_init and not self.node.model_path and cfg.model.path not in ALIASES:
      return ("the config's model.path is a path on the server; set this node's own copy with "
              "node config model-path")
    try:
      protocol.check_deployable(cfg)
    except ValueError as e:
      return str(e)
    return ""

  # -- building ----------------------------------------------------------------------------

  def _run(self, run_id: str, cfg) -> _Run:
    if run_id in self._runs:
      return self._runs[run_id]
    model, tok, fingerprint, _ = build_lib.load_base(cfg)
    build_lib.attach_lora(model, cfg, tok)
    graphdef, lora, frozen = lora_lib.split(model)
    d = cfg.data
    task = tasks.get(d.task)
    ex = task.train_examples(task.items(task.read(d.train_file, "train"), d), tok, d)
    if len(ex) > d.max_client_size:  # the size itself is private: not in the reply
      print(f"[dplora client {self.node.client_id}] {d.train_file} holds {len(ex)} examples",
            file=sys.stderr)
      raise OverBound(f"its data is above the public bound data.max_client_size="
                      f"{d.max_client_size}")
    if len(ex) == 0:
      raise ValueError(f"{d.train_file} holds no training examples")
    plan = self.state.plan(cfg, build_lib.privacy_plan)
    max_batch, rates = build_lib.sampling_shape(cfg, plan, [len(ex)])
    sampler = sampling.PoissonSampler([len(ex)], rates, max_batch,
                                      poisson=d.sampling == "poisson", fixed_batch=d.batch_size)
    loss_positions = task.loss_positions(tok, d)
    if int(ex.loss_mask.sum(1).max()) > loss_positions:
      raise ValueError("an example's answer is longer than the task's loss positions")
    buckets = buckets_lib.bucket_lengths(d.max_length, d.length_buckets)
    spec = client_lib.ClientSpec.from_plan(plan, cfg, loss_positions, buckets,
                                           build_lib.loss_labels(cfg, task, tok))
    o = cfg.optim
    train = _local_train(graphdef, spec, o.optimizer, o.learning_rate, o.weight_decay)
    data = {k: getattr(ex, k) for k in ("tokens", "mask", "targets", "loss_mask")}
    run = _Run(cfg, fingerprint, lora, frozen, data, ex.mask.sum(1), sampler, spec, plan, train,
               plan.server)
    self._runs[run_id] = run
    return run

  # -- training ----------------------------------------------------------------------------

  def _train(self, run_id: str, run: _Run, round_: int, client_clip: float,
             arrays: dict, asked: str) -> dict:
    cid, node, plan = self.node.client_id, self.node, run.plan
    refuse = functools.partial(protocol.refusal, protocol.TRAIN, cid, round=round_)
    try:
      global_lora = protocol.arrays_to_lora(arrays, run.lora)
    except protocol.ProtocolError as e:
      return refuse(f"bad global model: {e}")
    seen = self.state.trained(run_id, round_)
    mech = plan.get("example")
    record = mechanism_record(mech) if mech else None
    budget = node.max_epsilon
    if seen is not None and seen != asked:
      return refuse(f"round {round_} was already trained from another global model or config; "
                    "its noise is never reused on a different input", epsilon=self._epsilon(),
                    epsilon_budget=budget)
    after = None  # this client's eps once this round is recorded (computed once: dp-accounting)
    if seen is None and mech is not None:
      after = self.state.entry((run_id, record), 1).epsilon
      if after > budget * (1 + 1e-9):
        return refuse(f"privacy budget: one more round would spend eps={after:.4f} > this "
                      f"node's max-epsilon={budget}", epsilon=self._epsilon(),
                      epsilon_budget=budget)
    randomness = self.state.randomness(run_id, run.cfg.dp.reproducible_seed)
    idx, valid = run.sampler.sample_client(0, run.cfg.fed.local_steps,
                                           randomness.examples(cid, round_))
    bucket = self._buckets(run, idx, valid)
    client_key, _ = round_lib.round_keys(randomness.noise_key, jnp.int32(round_))
    key = jax.random.fold_in(client_key, cid)
    delta, _ = run.train(global_lora, run.frozen, run.data, idx, valid, key, bucket)
    if run.client_dp is not None:  # client-level DP: the server noises the sum of these
      stacked = jax.tree.map(lambda x: x[None], delta)
      delta, _, _ = run.client_dp.clip(stacked, jnp.ones((1,), bool), jnp.float32(client_clip))
    update = protocol.lora_to_arrays(jax.device_get(delta))
    if not all(np.isfinite(a).all() for a in update.values()):
      return refuse("the local update is not finite (lower the learning rate)",
                    epsilon=self._epsilon(), epsilon_budget=budget)
    if seen is None and record is not None:
      self.state.record(run_id, round_, asked, record)  # durable before it leaves
    return protocol.reply(protocol.TRAIN, update, client_id=cid, round=round_,
                          status=protocol.OK, reason="",
                          epsilon=self._epsilon(run) if after is None else float(after),
                          epsilon_budget=budget)

  def _epsilon(self, run: _Run | None = None) -> float:
    """This client's example-level eps over every run on its data (inf for a run without
    example-level DP: nothing protects its examples there)."""
    if run is not None and run.plan.get("example") is None:
      return math.inf
    entry = self.state.entry()
    return 0.0 if entry is None else float(entry.epsilon)

  @staticmethod
  def _buckets(run: _Run, idx, valid):
    spec = run.spec
    if len(spec.buckets) <= 1:
      return np.zeros((idx.shape[0], idx.shape[1] // spec.microbatch), np.int32) + max(
          len(spec.buckets) - 1, 0)
    idx2, valid2 = buckets_lib.order_by_length(idx[None], valid[None], [run.lengths])
    idx[:], valid[:] = idx2[0], valid2[0]
    return buckets_lib.microbatch_buckets(idx2, valid2, [run.lengths], spec.buckets,
                                          spec.microbatch)[0]
