"""The federated round as ONE compiled SPMD program.

devices: `jax.shard_map` over the mesh axis "clients"; clients on a device: `jax.vmap`; local steps:
`lax.scan`; per-example gradients: `vmap(grad)` in `lax.scan` microbatches. The weighted sum of
client deltas is a `psum`; the server optimizer runs in the same jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dplora_jax import distributed, lora as lora_lib
from dplora_jax.data import buckets as buckets_lib
from dplora_jax.dp.mechanisms import CentralDPSGD, ClientDP
from dplora_jax.federated import aggregation, client as client_lib

PyTree = Any
AXIS = "clients"
FSDP = "fsdp"


class RoundState(NamedTuple):
  """What changes across rounds (and is checkpointed): never the frozen base weights."""
  round: jax.Array  # int32 scalar: rounds completed
  lora: PyTree
  server_opt: PyTree
  client_clip: jax.Array  # float32 scalar: S of client-level DP (adaptive clipping moves it)


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> jax.sharding.Mesh:
  """The round's mesh: `num_devices` devices (default: all) as ("clients",), or with `fsdp` > 1
  as ("clients", "fsdp") of shape (num_devices / fsdp, fsdp): the clients axis splits the
  clients, the fsdp axis the frozen base weights (`frozen_shardings`).

  The fsdp axis is Auto (XLA places the collectives a sharded weight needs); "clients" is manual
  inside the round (`shard_map` over it only).
  """
  n = num_devices or jax.device_count()
  if fsdp == 1:
    return jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices of the round.")
  return jax.make_mesh((n // fsdp, fsdp), (AXIS, FSDP), devices=jax.devices()[:n],
                       axis_types=(AxisType.Explicit, AxisType.Auto))


def frozen_shardings(mesh, frozen: PyTree) -> PyTree:
  """Shardings of the frozen base weights: replicated over "clients"; with an fsdp axis, each
  weight split along its largest dimension that fsdp divides (never the scanned layer axis of a
  stacked weight; vectors such as norm scales stay whole)."""
  fsdp = mesh.shape.get(FSDP, 1)

  def one(path, x):
    stacked = any(getattr(k, "key", None) == "layers" for k in path)
    dims = list(range(1 if stacked else 0, x.ndim))
    if fsdp == 1 or len(dims) < 2:
      return NamedSharding(mesh, P())
    best = max((d for d in dims if x.shape[d] % fsdp == 0), key=lambda d: x.shape[d],
               default=None)
    if best is None:
      return NamedSharding(mesh, P())
    spec = [None] * x.ndim
    spec[best] = FSDP
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(one, frozen)


def make_server_optimizer(name: str, learning_rate: float, momentum: float = 0.0,
                          decay: str = "constant", rounds: int = 1,
                          adam_eps: float = 1e-3) -> optax.GradientTransformation:
  """FedAvg (SGD on the negated average delta; lr 1 = plain averaging; with `momentum`, FedAvgM)
  or FedAdam (b1 0.9, b2 0.99, epsilon `adam_eps`: Reddi et al.'s tau); `decay='cosine'`: the
  learning rate falls from `learning_rate` in round 1 to 0 after round `rounds` (the optimizer's
  own count is the round)."""
  if decay == "cosine":
    learning_rate = optax.cosine_decay_schedule(learning_rate, decay_steps=rounds)
  elif decay != "constant":
    raise ValueError(f"fed.server_lr_decay={decay!r}; expected 'constant' or 'cosine'.")
  if name == "fedavg":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if momentum:
    raise ValueError(f"fed.server_momentum={momentum} with fed.server_optimizer={name!r}; "
                     "momentum is for 'fedavg'.")
  if name == "fedadam":
    return optax.adam(learning_rate, b1=0.9, b2=0.99, eps=adam_eps)
  raise ValueError(f"fed.server_optimizer={name!r}; expected 'fedavg' or 'fedadam'.")


def server_optimizer(fed) -> optax.GradientTransformation:
  """The server optimizer a run's `fed` config names."""
  return make_server_optimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum,
                               fed.server_lr_decay, fed.rounds, fed.server_adam_eps)


def init_state(lora: PyTree, server_tx: optax.GradientTransformation,
               client_clip: float = 0.0) -> RoundState:
  """A fresh state owning a copy of `lora` (the round donates its state; the caller's LoRA
  arrays stay valid)."""
  lora = jax.tree.map(jnp.copy, lora)
  return RoundState(jnp.int32(0), lora, server_tx.init(lora), jnp.float32(client_clip))


def make_round_step(graphdef, spec: client_lib.ClientSpec, client_tx, server_tx, mesh,
                    client_dp: ClientDP | None = None, ordered: bool = False,
                    central: CentralDPSGD | None = None):
  """Builds `round_step(state, frozen, data, idx, valid, weights, client_ids, noise_key,
  buckets=None)`.

  Args:
    graphdef, spec, client_tx: the client's model definition, mechanism and optimizer.
    server_tx: the server optimizer (applied to the negated average update).
    mesh: a mesh with a "clients" axis.
    client_dp: client-level DP at the server (DP-FedAvg; the plan's `server`), or None
      (weighted FedAvg).
    ordered: sum the client updates in client order after an all_gather (results bitwise
      independent of the device and process layout; K LoRA-sized rows per device) instead of a
      psum of per-device sums (equal up to float summation order).
    central: `dp.noise_at='server'` (the plan's `central`): the clients send their clipped
      gradient sums (`client_lib.clipped_step_sum`, spec.noise_at 'server'), the server noises
      their sum once (`CentralDPSGD.release`); None: the clients' releases are their updates.

  Args (of the returned function):
    state: RoundState (donated).
    frozen: frozen base weights (replicated, never donated).
    data: dict of [K, n_max, T] client examples, sharded over "clients".
    idx, valid: [K, S, Bmax] sampled example indices and masks.
    weights: [K] float aggregation weights; 0 for unsampled and padding clients (1 for
      participants under client-level DP).
    client_ids: [K] int32 global client ids (noise keys derive from them).
    buckets: [K, S, Bmax / microbatch] int32 microbatch length buckets (`data.buckets`), or None
      (every microbatch at the full length).
    noise_key: the run's secret DP-noise key. It feeds two streams only: clients use
      fold_in(fold_in(fold_in(noise_key, 0), r), client_id), then fold_in(., step); the server
      uses fold_in(fold_in(noise_key, 1), r) (and fold_in(., 2) of it for `central`).

  Returns:
    (new state, {"public": ..., "diagnostics": ...}). "public" holds only what the release
    definition allows (`dp.release`): participants, whether the new LoRA is finite, and the
    client-level S and noised unclipped fraction. "diagnostics" (only with spec.diagnostics)
    holds unnoised statistics of private data. The noise itself is never returned.

  Formal guarantee: each client's update is `client_lib.local_train` (its mechanism is stated
  there); with `client_dp`, the server's release is `ClientDP.release` of updates clipped by
  `ClientDP.clip`; with `central`, the server's release is `CentralDPSGD.release` of the sum of
  the clients' clipped sums (weights 0 or 1: every example counted at most once); everything
  else post-processes those releases. Zero-weight clients contribute exactly zero.
  """
  if (central is not None) != (spec.noise_at == "server"):
    raise ValueError("dp.noise_at='server' needs both the clients' clipped sums "
                     "(spec.noise_at='server') and the aggregator's release (central).")
  if central is not None:
    def local(lora, frozen, data, idx, valid, key, bucket):  # no key: the aggregator noises
      del key
      return client_lib.clipped_step_sum(graphdef, spec, lora, frozen, data, idx, valid, bucket)
  else:
    local = functools.partial(client_lib.local_train, graphdef, spec, client_tx)
  # one client group (e.g. every device in fsdp): no collective over "clients" (XLA rejects a
  # size-1 manual axis's all-reduce next to auto-partitioned fsdp collectives; it is the identity)
  one_group = mesh.shape[AXIS] == 1
  psum = (lambda x: x) if one_group else functools.partial(jax.lax.psum, axis_name=AXIS)
  gather = ((lambda x: x) if one_group
            else functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True))

  def per_device(lora, frozen, data, idx, valid, weights, client_ids, round_key, client_clip,
                 buckets):
    keys = jax.vmap(lambda c: jax.random.fold_in(round_key, c))(client_ids)
    if spec.client_loop == "map":  # one client after another: each runs only its own work
      deltas, stats = jax.lax.map(lambda xs: local(lora, frozen, *xs),
                                  (data, idx, valid, keys, buckets))
    else:
      deltas, stats = jax.vmap(local, in_axes=(None, None, 0, 0, 0, 0, 0))(
          lora, frozen, data, idx, valid, keys, buckets)
    take = weights > 0
    sums = {k: jnp.sum(jnp.where(take, v, 0.0)) for k, v in stats.items()}
    sums["participants"] = jnp.sum(take.astype(jnp.float32))
    sums["weight"] = jnp.sum(weights.astype(jnp.float32))
    if ordered:  # every client's row to every device, summed in client order
      if client_dp is None:
        rows = aggregation.weighted_rows(deltas, weights)
      else:
        rows, sums["shifted_count"], _ = client_dp.clip_rows(deltas, take, client_clip)
      return aggregation.ordered_sum(gather(rows)), psum(sums)
    if client_dp is None:
      summed = aggregation.weighted_sum(deltas, weights)
    else:
      summed, sums["shifted_count"], _ = client_dp.clip(deltas, take, client_clip)
    return psum((summed, sums))

  # manual over "clients" only: an fsdp axis stays with XLA (the frozen weights' collectives)
  manual = {AXIS} if FSDP in mesh.axis_names else set(mesh.axis_names)
  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(), P(), P(AXIS)),
      out_specs=P(), axis_names=manual, check_vma=False)  # client scans start from zeros

  def round_step(state: RoundState, frozen, data, idx, valid, weights, client_ids, noise_key,
                 buckets=None):
    client_key, server_key = round_keys(noise_key, state.round)
    if buckets is None:  # every microbatch at the full length
      buckets = jax.sharding.reshard(
          jnp.full(idx.shape[:2] + (idx.shape[2] // spec.microbatch,),
                   max(len(spec.buckets) - 1, 0), jnp.int32), NamedSharding(mesh, P(AXIS)))
    summed, sums = sharded(state.lora, frozen, data, idx, valid, weights, client_ids,
                           client_key, state.client_clip, buckets)
    new_state, public = server_update(server_tx, client_dp, state, summed, sums["weight"],
                                      sums.get("shifted_count"), server_key, spec.first_layer,
                                      central)
    public = dict(public, participants=sums["participants"])
    diagnostics = {}
    if spec.diagnostics:
      n = jnp.maximum(sums["participants"], 1.0)
      diagnostics = {"loss": sums["loss"] / n, "clip_fraction": sums["clip_fraction"] / n,
                     "signal_norm": sums["signal_norm"] / n, "examples": sums["examples"]}
      if client_dp is not None:
        diagnostics["unclipped_clients"] = sums["shifted_count"] + 0.5 * sums["participants"]
    return new_state, {"public": public, "diagnostics": diagnostics}

  # Pin the state's sharding (replicated) so round 2 sees exactly round 1's input layout and the
  # program compiles once.
  replicated = NamedSharding(mesh, P())
  return jax.jit(round_step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def run_round_step(cfg, plan, graphdef, loss_positions: int, mesh,
                   label_tokens: tuple[int, ...] = ()):
  """(client spec, server optimizer, round step) of a run's config on `mesh`: the one place
  that turns a RunConfig and its privacy plan into the round (the run loop, the memory planner).

  With an fsdp axis the clients' loops are made uniform over "clients" (`ClientSpec.uniform_axis`)
  and each microbatch's examples are spread over "fsdp" (`ClientSpec.example_axis`).
  """
  d = cfg.data
  spec = client_lib.ClientSpec.from_plan(plan, cfg, loss_positions,
                                         buckets_lib.bucket_lengths(d.max_length,
                                                                    d.length_buckets),
                                         label_tokens)
  if FSDP in mesh.axis_names:
    spec = dataclasses.replace(spec, uniform_axis=AXIS if mesh.shape[AXIS] > 1 else "",
                               example_axis=FSDP)
  client_tx = client_lib.make_client_optimizer(cfg.optim.optimizer, cfg.optim.learning_rate,
                                               cfg.optim.weight_decay)
  server_tx = server_optimizer(cfg.fed)
  step = make_round_step(graphdef, spec, client_tx, server_tx, mesh, plan.server,
                         cfg.mesh.ordered_aggregation, plan.central)
  return spec, server_tx, step


def server_update(server_tx: optax.GradientTransformation, client_dp: ClientDP | None,
                  state: RoundState, summed: PyTree, weight: jax.Array,
                  shifted_count: jax.Array | None, server_key: jax.Array,
                  first_layer: int = 0, central: CentralDPSGD | None = None):
  """The server's half of a round: from the summed client updates to the next state.

  Shared by the one-program round (`make_round_step`) and the deployed server
  (`dplora_jax.deploy.server`), so both apply the same mechanism and optimizer.

  Args:
    summed: without client-level DP, sum_k w_k delta_k; with it, the sum of updates clipped to
      the state's S (`ClientDP.clip`); with `central`, the sum of the participants' clipped
      gradient sums (`client_lib.clipped_step_sum`).
    weight: sum_k w_k, the FedAvg divisor (fixed before any client replies: the sampled clients'
      weights; with `central` the number of participants); unused with client-level DP (its
      divisor is the public p K).
    shifted_count: the adaptive-clipping count of `ClientDP.clip` (None without it).
    server_key: this round's server noise key (client-level DP only).
    first_layer: `lora.first_layer`: the average update is zeroed below this layer
      (post-processing: the clients' updates are zero there, only server noise is dropped).
    central: `dp.noise_at='server'`: the example-level release happens here (`CentralDPSGD`).

  Returns:
    (new RoundState, public: client-level S and noised unclipped fraction where they exist, and
    whether the new LoRA is finite).

  Formal guarantee: with `client_dp`, `ClientDP.release`; with `central`,
  `CentralDPSGD.release` (see there); otherwise post-processing of the clients' releases.
  """
  public, client_clip = {}, state.client_clip
  if central is not None:
    avg_delta = central.release(jax.random.fold_in(server_key, 2), summed, weight)
  elif client_dp is None:
    denom = jnp.maximum(weight, 1e-12)
    avg_delta = jax.tree.map(lambda d: d / denom, summed)
  else:
    count = jnp.float32(0) if shifted_count is None else shifted_count
    avg_delta, client_clip, public = client_dp.release(server_key, summed, count,
                                                       state.client_clip)
  neg = jax.tree.map(jnp.negative, lora_lib.zero_below(avg_delta, first_layer))
  updates, server_opt = server_tx.update(neg, state.server_opt, state.lora)
  new_lora = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype),
                          state.lora, updates)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_lora)]))
  public = dict(public, lora_finite=finite)
  return RoundState(state.round + 1, new_lora, server_opt, client_clip), public


def round_keys(noise_key: jax.Array, round_: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the clients' round key, the server's round key) of round `round_` (0-based). Client k uses
  fold_in(clients' round key, k), then fold_in(., step)."""
  return (jax.random.fold_in(jax.random.fold_in(noise_key, 0), round_),
          jax.random.fold_in(jax.random.fold_in(noise_key, 1), round_))


def client_sharding(mesh) -> NamedSharding:
  """Arrays with a leading client axis, split over "clients"."""
  return NamedSharding(mesh, P(AXIS))


def shard_clients(mesh, tree: PyTree) -> PyTree:
  """Places host arrays with a leading client axis on the mesh (split over "clients"); in a
  multi-process run each process reads only the rows its devices hold."""
  return distributed.place(client_sharding(mesh), tree)


def replicate(mesh, tree: PyTree) -> PyTree:
  """Places a tree on every device of the mesh (in a multi-process run without comparing it
  across processes: each process provides its own copy)."""
  return distributed.place(NamedSharding(mesh, P()), tree)
