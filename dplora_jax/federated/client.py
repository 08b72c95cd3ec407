"""One client's local training: per-example DP-SGD on the LoRA pytree, steps under lax.scan.

What a client releases is its update (local LoRA - global LoRA) and nothing else: in `sample`
mode that update is post-processing of DP-SGD releases; in `paper` mode of the paper's group
releases; in `client` mode the server clips and noises it (`dp.mechanisms.ClientDP`). Statistics
of the private batch (loss, clip counts, norms, example counts) are computed only when
`ClientSpec.diagnostics` is on, and are then labelled non-private by the report.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dplora_jax import lora as lora_lib, losses
from dplora_jax.dp import clipping
from dplora_jax.dp.mechanisms import DPSGD, PaperGroups

PyTree = Any


def example_loss(graphdef, lora: PyTree, frozen: PyTree, tokens: jax.Array, mask: jax.Array,
                 targets: jax.Array, loss_mask: jax.Array, hidden: jax.Array | None = None, *,
                 positions: int = 0, label_tokens: tuple[int, ...] = ()) -> jax.Array:
  """Causal-LM loss of one example, averaged over its response (label) tokens.

  Args:
    tokens, mask, targets, loss_mask: [T] arrays of one example.
    hidden: [T, D] its cached frozen-prefix activations (`lora.frozen_prefix`), or None.
    positions: P > 0 computes the head and the softmax only at the first P loss positions (every
      example must have at most P answer tokens); 0 computes them at all T positions.
    label_tokens: () for the LM loss; else the label words' first tokens: the loss is the
      cross-entropy of the softmax over those logits only, at the first answer position (needs
      P > 0; the target there must be one of them).
  """
  h = None if hidden is None else hidden[None]
  if positions:
    pos, valid = losses.answer_positions(loss_mask, positions)
    logits = lora_lib.apply(graphdef, lora, frozen, tokens[None], mask[None], pos[None],
                            hidden=h)[0]
    if label_tokens:
      return -losses.label_logprob(logits[0], targets[pos[0]], jnp.asarray(label_tokens))
    nll = -losses.token_logprob(logits, targets[pos])
    w = valid.astype(jnp.float32)
  else:
    logits = lora_lib.apply(graphdef, lora, frozen, tokens[None], mask[None], hidden=h)[0]
    nll = -losses.token_logprob(logits, targets)
    w = loss_mask.astype(jnp.float32)
  return jnp.sum(jnp.where(w > 0, nll, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """Static description of a client's local step (hashable; closed over by the jitted round).

  Attributes:
    microbatch: per-example gradients computed this many at a time (a loop over microbatches).
    local_steps: S.
    dpsgd: per-example DP-SGD (the plan's spec), or None.
    paper: the paper's group release (the plan's spec), or None. At most one of the two; with
      neither the client takes plain mean-gradient steps (no privacy).
    diagnostics: also compute unnoised statistics of the private batch (never by default).
    loss_positions: P > 0: the loss's head and softmax run at P answer positions only (the
      longest answer); 0: at every position.
    length_buckets: ascending sequence lengths (the last = the data's T): each microbatch runs
      at the shortest that holds its longest example (`lax.switch`; `data.buckets` sorts the
      sample by length so microbatches are alike). () = always the full T.
    client_loop: "map" (the clients of a device one after another: each runs only its own
      microbatches, and a bucket's branch alone) or "vmap" (batched; every client runs the
      largest client's microbatches, and buckets are ignored).
    uniform_axis: a mesh axis ("clients") over which the microbatch loop's trip count and each
      microbatch's bucket are made equal (their max), or "" (each client its own). Needed when
      the step holds collectives of another axis (fsdp-sharded weights): devices running
      different trip counts or branches would wait for each other forever. Results are the same
      (extra microbatches hold only padding; a longer bucket holds every real token).
    example_axis: a mesh axis ("fsdp") the per-example vmap spreads a microbatch's examples over
      (`jax.vmap(spmd_axis_name=...)`), or "" (no constraint). Layout only: the same values.
    first_layer: `lora.first_layer`: each step's privatised gradient is zeroed below this layer
      (post-processing; the gradient there is exactly zero, only noise is dropped).
    label_tokens: `optim.loss='labels'`: the label words' first tokens (see `example_loss`); ()
      for the LM loss.
    noise_at: "client" (`local_train`: the client noises its own release) or "server"
      (`clipped_step_sum`: the client only clips; a trusted aggregator noises the total, see
      `dp.mechanisms.CentralDPSGD`).
  """
  microbatch: int
  local_steps: int
  dpsgd: DPSGD | None = None
  paper: PaperGroups | None = None
  diagnostics: bool = False
  loss_positions: int = 0
  length_buckets: tuple[int, ...] = ()
  client_loop: str = "map"
  uniform_axis: str = ""
  example_axis: str = ""
  first_layer: int = 0
  label_tokens: tuple[int, ...] = ()
  noise_at: str = "client"

  def __post_init__(self):
    if self.dpsgd is not None and self.paper is not None:
      raise ValueError("a client step uses one mechanism: dpsgd or paper, not both.")
    if self.client_loop not in ("map", "vmap"):
      raise ValueError(f"fed.client_loop={self.client_loop!r}; expected 'map' or 'vmap'.")
    if self.label_tokens and not self.loss_positions:
      raise ValueError("a label loss needs loss positions (the first answer position).")
    if list(self.length_buckets) != sorted(set(self.length_buckets)):
      raise ValueError(f"length buckets {self.length_buckets} must be strictly ascending.")
    if self.noise_at == "server" and (self.dpsgd is None or self.local_steps != 1):
      raise ValueError("dp.noise_at='server' needs per-example DP-SGD and one local step.")

  @property
  def buckets(self) -> tuple[int, ...]:
    """The buckets the step switches between (none under vmap, where a switch runs them all)."""
    return self.length_buckets if self.client_loop == "map" else ()

  @property
  def mechanism(self) -> str:
    return "sample" if self.dpsgd else ("paper" if self.paper else "none")

  @classmethod
  def from_plan(cls, plan, cfg, loss_positions: int = 0, length_buckets: tuple[int, ...] = (),
                label_tokens: tuple[int, ...] = ()) -> "ClientSpec":
    """The client step of `cfg` with the mechanism its privacy plan built."""
    return cls(microbatch=cfg.optim.microbatch_size, local_steps=cfg.fed.local_steps,
               dpsgd=plan.dpsgd, paper=plan.paper, diagnostics=cfg.private_diagnostics,
               loss_positions=loss_positions, length_buckets=tuple(length_buckets),
               client_loop=cfg.fed.client_loop, first_layer=cfg.lora.first_layer,
               label_tokens=tuple(label_tokens),
               noise_at="server" if plan.central is not None else "client")


def full_length_buckets(spec: ClientSpec, idx: jax.Array) -> jax.Array:
  """[S, Bmax / microbatch] bucket indices that run every microbatch at the full length."""
  return jnp.full(idx.shape[:1] + (idx.shape[1] // spec.microbatch,),
                  max(len(spec.buckets) - 1, 0), jnp.int32)


def per_example_grads_sum(graphdef, spec: ClientSpec, lora, frozen, batch: dict,
                          valid: jax.Array, bucket: jax.Array | None = None):
  """Sum over valid examples of (clipped, with DP-SGD) per-example gradients, in microbatches.

  Args:
    batch: dict of [Bmax, T] arrays (tokens, mask, targets, loss_mask), right-padded; with
      `lora.first_layer` > 0 optionally "hidden" [Bmax, T, D], the cached frozen prefix.
    valid: [Bmax] bool (any layout; rows first is fastest). Bmax is a multiple of the
      microbatch size.
    bucket: [Bmax / microbatch] int32, each microbatch's index into `spec.buckets` (its rows'
      real tokens all lie within that length), or None (full T).

  Returns:
    (grad_sum pytree, stats dict: loss_sum, count, clipped; all private).

  Formal guarantee (DP-SGD): the sum changes by at most C in L2 norm when one valid example is
  added or removed (see `clipping.clip_and_sum`); padded rows contribute exactly zero.
  """
  loss_fn = functools.partial(example_loss, positions=spec.loss_positions,
                              label_tokens=spec.label_tokens)
  grad_fn = jax.vmap(jax.value_and_grad(loss_fn, argnums=1),
                     in_axes=(None, None, None, 0, 0, 0, 0, 0),
                     spmd_axis_name=spec.example_axis or None)

  def grads_at(length, b):
    # right padding: cutting the columns after `length` removes only padding (causal attention,
    # positions from the mask), so the values are those of the full row
    b = jax.tree.map(lambda x: x[:, :length], b) if length else b
    return grad_fn(graphdef, lora, frozen, b["tokens"], b["mask"], b["targets"], b["loss_mask"],
                   b.get("hidden"))

  branches = [functools.partial(grads_at, n) for n in spec.buckets]
  mb = spec.microbatch
  # Microbatches after the last valid row hold only padding: a while loop skips them (the sampler
  # puts sampled rows first). Under vmap over clients it runs to the largest client's need;
  # results are identical either way, only time is saved.
  end = jnp.max(jnp.where(valid, jnp.arange(valid.shape[0]) + 1, 0))
  num_micro = (end + mb - 1) // mb
  if spec.uniform_axis:
    num_micro = jax.lax.pmax(num_micro, spec.uniform_axis)

  def body(i, acc):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * mb, mb)
    b = jax.tree.map(take, batch)
    v = take(valid)
    if len(branches) > 1 and bucket is not None:
      which = bucket[i]
      if spec.uniform_axis:
        which = jax.lax.pmax(which, spec.uniform_axis)
      losses, grads = jax.lax.switch(which, branches, b)
    else:
      losses, grads = grads_at(0, b)
    if spec.dpsgd is not None:
      clipped = clipping.clip_and_sum(grads, v, spec.dpsgd.clip_norm)
      summed, n_clipped = clipped.sum, clipped.clipped
    else:  # plain sum; a non-finite example gradient is dropped here too
      summed, n_clipped = clipping.masked_sum(grads, v)
    acc_g, loss_sum, n_clip = acc
    acc_g = jax.tree.map(jnp.add, acc_g, summed)
    return acc_g, loss_sum + jnp.sum(jnp.where(v, losses, 0.0)), n_clip + n_clipped

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
  g, loss_sum, n_clipped = jax.lax.fori_loop(0, num_micro, body,
                                             (zeros, jnp.float32(0), jnp.int32(0)))
  return g, {"loss_sum": loss_sum, "count": jnp.sum(valid), "clipped": n_clipped}


def privatized_gradient(graphdef, spec: ClientSpec, lora, frozen, batch, valid, key,
                        bucket=None):
  """One step's gradient estimate and its (private) statistics.

  DP-SGD: `DPSGD.release` of the clipped sum, (sum + N(0, (sigma C)^2)) / B. Paper:
  `PaperGroups.release` of the batch-mean gradient. None: the mean gradient of the valid examples.

  Formal guarantee: that of the mechanism's `release` (see `dp.mechanisms`).
  """
  g_sum, stats = per_example_grads_sum(graphdef, spec, lora, frozen, batch, valid, bucket)
  if spec.dpsgd is not None:
    grad = spec.dpsgd.release(key, g_sum)
    stats["signal_norm"] = clipping.global_norm(g_sum) / spec.dpsgd.divisor
    return grad, stats
  denom = jnp.maximum(stats["count"], 1).astype(jnp.float32)
  mean = jax.tree.map(lambda x: x / denom, g_sum)
  stats["signal_norm"] = clipping.global_norm(mean)
  if spec.paper is not None:
    grad, norms = spec.paper.release(key, mean)
    stats["clipped"] = sum((n > spec.paper.clip_norm).astype(jnp.int32) for n in norms.values())
    return grad, stats
  return mean, stats


def make_client_optimizer(name: str, learning_rate: float, weight_decay: float):
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"optim.optimizer={name!r}; expected 'sgd' or 'adamw'.")


def local_train(graphdef, spec: ClientSpec, tx: optax.GradientTransformation,
                lora, frozen, data: dict, idx: jax.Array, valid: jax.Array, key: jax.Array,
                bucket: jax.Array | None = None):
  """Runs `local_steps` steps of one client from the global LoRA.

  Args:
    data: the client's examples, dict of [n_max, T] arrays.
    idx, valid: [S, Bmax] sampled indices and their mask.
    key: this client's noise key for this round; step s uses fold_in(key, s).
    bucket: [S, Bmax / microbatch] microbatch length buckets (see `per_example_grads_sum`).

  Returns:
    (delta = local LoRA - global LoRA: the client's release, private statistics: {} unless
    spec.diagnostics).
  """
  if spec.noise_at != "client":  # its delta would be un-noised: only `clipped_step_sum` may run
    raise ValueError("dp.noise_at='server': the client releases its clipped sum to the trusted "
                     "aggregator (clipped_step_sum), never an un-noised local step.")
  opt_state = tx.init(lora)

  if bucket is None:
    bucket = full_length_buckets(spec, idx)

  def step(carry, xs):
    params, opt_state = carry
    s, step_idx, step_valid, step_bucket = xs
    batch = jax.tree.map(lambda a: jnp.take(a, step_idx, axis=0), data)
    grad, stats = privatized_gradient(graphdef, spec, params, frozen, batch, step_valid,
                                      jax.random.fold_in(key, s), step_bucket)
    grad = lora_lib.zero_below(grad, spec.first_layer)
    updates, opt_state = tx.update(grad, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), (stats if spec.diagnostics else {})

  (local, _), stats = jax.lax.scan(step, (lora, opt_state),
                                   (jnp.arange(spec.local_steps), idx, valid, bucket))
  delta = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), local, lora)
  if not spec.diagnostics:
    return delta, {}
  count = jnp.maximum(jnp.sum(stats["count"]), 1)
  return delta, {"loss": jnp.sum(stats["loss_sum"]) / count,
                 "clip_fraction": jnp.sum(stats["clipped"]) / count,
                 "signal_norm": jnp.mean(stats["signal_norm"]),
                 "examples": jnp.sum(stats["count"]).astype(jnp.float32)}


def clipped_step_sum(graphdef, spec: ClientSpec, lora, frozen, data: dict, idx: jax.Array,
                     valid: jax.Array, bucket: jax.Array | None = None):
  """One client's share of a `dp.noise_at='server'` round: the sum of its clipped per-example
  gradients on its (single) step's Poisson sample, un-noised, for the trusted aggregator.

  Args:
    data, idx, valid, bucket: as `local_train` ([1, Bmax] sample: one local step).

  Returns:
    (clipped gradient sum, zero below `spec.first_layer`; private statistics: {} unless
    spec.diagnostics).

  Formal guarantee: adding or removing one valid example moves the sum by at most C
  (`clipping.clip_and_sum`); padded rows contribute exactly zero. It is NOT private on its own:
  `dp.mechanisms.CentralDPSGD.release` noises the sum over clients.
  """
  if spec.noise_at != "server" or spec.dpsgd is None:
    raise ValueError("clipped_step_sum is the client half of dp.noise_at='server' only.")
  if bucket is None:
    bucket = full_length_buckets(spec, idx)
  batch = jax.tree.map(lambda a: jnp.take(a, idx[0], axis=0), data)
  g_sum, stats = per_example_grads_sum(graphdef, spec, lora, frozen, batch, valid[0], bucket[0])
  g_sum = lora_lib.zero_below(g_sum, spec.first_layer)
  if not spec.diagnostics:
    return g_sum, {}
  count = jnp.maximum(stats["count"], 1)
  return g_sum, {"loss": stats["loss_sum"] / count, "clip_fraction": stats["clipped"] / count,
                 "signal_norm": clipping.global_norm(g_sum) / spec.dpsgd.divisor,
                 "examples": stats["count"].astype(jnp.float32)}
