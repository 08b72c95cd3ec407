"""One client's local training: per-example DP-SGD on the LoRA pytree, steps under lax.scan."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dplora_jax import lora as lora_lib
from dplora_jax.dp import clipping, noise

PyTree = Any


def example_loss(graphdef, lora: PyTree, frozen: PyTree, tokens: jax.Array, mask: jax.Array,
                 targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Causal-LM loss of one example, averaged over its response (label) tokens.

  Args:
    tokens, mask, targets, loss_mask: [T] arrays of one example.
  """
  logits = lora_lib.apply(graphdef, lora, frozen, tokens[None], mask[None])[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
  w = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """Static description of a client's local step (hashable; closed over by the jitted round).

  Attributes:
    mechanism: "sample" (per-example clip + noise on the sum: DP-SGD), "none" (mean gradient)
      or "paper" (the paper's Algorithm 1: batch-mean gradient, each factor group clipped to C
      and noised with std `paper_noise_std`).
    clip_norm: C.
    noise_multiplier: sigma ("sample").
    expected_batch: B, the divisor of the noised sum (never the realised sample size).
    microbatch: per-example gradients computed this many at a time (a loop over microbatches).
    local_steps: S.
    paper_noise_std: absolute noise std per group ("paper": sigma C, or sigma C / B).
  """
  mechanism: str
  clip_norm: float
  noise_multiplier: float
  expected_batch: int
  microbatch: int
  local_steps: int
  paper_noise_std: float = 0.0

  def __post_init__(self):
    if self.mechanism not in ("sample", "none", "paper"):
      raise ValueError(f"mechanism={self.mechanism!r}; expected 'sample', 'none' or 'paper'.")

  @property
  def private(self) -> bool:
    """Per-example clipping (DP-SGD)."""
    return self.mechanism == "sample"


def per_example_grads_sum(graphdef, spec: ClientSpec, lora, frozen, batch: dict,
                          valid: jax.Array):
  """Sum over valid examples of (clipped) per-example gradients, in microbatches.

  Args:
    batch: dict of [Bmax, T] arrays (tokens, mask, targets, loss_mask).
    valid: [Bmax] bool (any layout; rows first is fastest). Bmax is a multiple of the
      microbatch size.

  Returns:
    (grad_sum pytree, stats dict with loss_sum, count, clipped, sensitivity).

  Formal guarantee (private): the sum changes by at most C in L2 norm when one valid example is
  added or removed (see `clipping.clip_and_sum`); padded rows contribute exactly zero.
  """
  grad_fn = jax.vmap(jax.value_and_grad(example_loss, argnums=1),
                     in_axes=(None, None, None, 0, 0, 0, 0))
  mb = spec.microbatch
  # Microbatches after the last valid row hold only padding: a while loop skips them (the sampler
  # puts sampled rows first). Under vmap over clients it runs to the largest client's need;
  # results are identical either way, only time is saved.
  end = jnp.max(jnp.where(valid, jnp.arange(valid.shape[0]) + 1, 0))
  num_micro = (end + mb - 1) // mb

  def body(i, acc):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * mb, mb)
    b = jax.tree.map(take, batch)
    v = take(valid)
    losses, grads = grad_fn(graphdef, lora, frozen, b["tokens"], b["mask"], b["targets"],
                            b["loss_mask"])
    if spec.private:
      summed, _, _, n_clipped = clipping.clip_and_sum(grads, v, spec.clip_norm)
    else:  # plain sum; a non-finite example gradient is dropped here too
      summed, n_clipped = clipping.masked_sum(grads, v)
    acc_g, loss_sum, n_clip = acc
    acc_g = jax.tree.map(jnp.add, acc_g, summed)
    return acc_g, loss_sum + jnp.sum(jnp.where(v, losses, 0.0)), n_clip + n_clipped

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
  g, loss_sum, n_clipped = jax.lax.fori_loop(0, num_micro, body,
                                             (zeros, jnp.float32(0), jnp.int32(0)))
  return g, {"loss_sum": loss_sum, "count": jnp.sum(valid), "clipped": n_clipped}


def paper_group_privatize(grad: PyTree, clip_norm: float, noise_std: float, key: jax.Array):
  """The paper's per-group release: each LoRA factor group (all A leaves; all B leaves) of the
  batch-mean gradient is clipped to L2 norm C as a whole, then N(0, noise_std^2) is added to
  every coordinate, with an independent key per group (fold_in(key, 0) for A, 1 for B).

  Returns:
    (noised gradient, {"a"/"b": pre-clip group norm}, the noise pytree).

  Formal guarantee: each group's clipped value has norm <= C for any batch, so replacing any
  part of the batch moves it by at most 2C (sensitivity 2C per group); each group release is a
  Gaussian mechanism with multiplier noise_std / (2C). See `dp.plan` for the composition.
  """
  leaves, treedef = jax.tree.flatten(grad)
  names = jax.tree.leaves(lora_lib.factor_of(grad))
  out, noise_leaves, norms = list(leaves), [jnp.zeros_like(x) for x in leaves], {}
  for gi, name in enumerate(("a", "b")):
    ids = [i for i, n in enumerate(names) if n == name]
    if not ids:  # FFA: no A group
      continue
    norm = clipping.global_norm([leaves[i] for i in ids])
    finite = jnp.isfinite(norm)
    factor = jnp.where(finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
    zs = noise.gaussian_noise_like(jax.random.fold_in(key, gi), [leaves[i] for i in ids],
                                   jnp.float32(noise_std))
    for z, i in zip(zs, ids):
      out[i] = jnp.where(finite, leaves[i] * factor, 0.0) + z
      noise_leaves[i] = z
    norms[name] = norm
  return (jax.tree.unflatten(treedef, out), norms,
          jax.tree.unflatten(treedef, noise_leaves))


def privatized_gradient(graphdef, spec: ClientSpec, lora, frozen, batch, valid, key):
  """One step's gradient estimate.

  "sample": (clipped sum + N(0, (sigma C)^2)) / B. "paper": the batch-mean gradient released by
  `paper_group_privatize`. "none": the mean gradient over the valid examples.

  Formal guarantee ("sample"): the Gaussian mechanism with L2 sensitivity C and noise multiplier
  sigma on the Poisson sample's clipped sum; dividing by the fixed expected batch B is
  post-processing. "paper": see `paper_group_privatize`.
  """
  g_sum, stats = per_example_grads_sum(graphdef, spec, lora, frozen, batch, valid)
  if spec.mechanism == "paper":
    denom = jnp.maximum(stats["count"], 1).astype(jnp.float32)
    mean = jax.tree.map(lambda x: x / denom, g_sum)
    grad, norms, z = paper_group_privatize(mean, spec.clip_norm, spec.paper_noise_std, key)
    stats["clipped"] = sum((n > spec.clip_norm).astype(jnp.int32) for n in norms.values())
    stats["noise_norm"] = clipping.global_norm(z)
    stats["signal_norm"] = clipping.global_norm(mean)
    return grad, stats
  if spec.private:
    noised, z = noise.add_gaussian_noise(key, g_sum, jnp.float32(spec.clip_norm),
                                         spec.noise_multiplier)
    grad = jax.tree.map(lambda x: x / spec.expected_batch, noised)
    stats["noise_norm"] = clipping.global_norm(z) / spec.expected_batch
    stats["signal_norm"] = clipping.global_norm(g_sum) / spec.expected_batch
  else:
    denom = jnp.maximum(stats["count"], 1).astype(jnp.float32)
    grad = jax.tree.map(lambda x: x / denom, g_sum)
    stats["noise_norm"] = jnp.float32(0)
    stats["signal_norm"] = clipping.global_norm(grad)
  return grad, stats


def make_client_optimizer(name: str, learning_rate: float, weight_decay: float):
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"optim.optimizer={name!r}; expected 'sgd' or 'adamw'.")


def local_train(graphdef, spec: ClientSpec, tx: optax.GradientTransformation,
                lora, frozen, data: dict, idx: jax.Array, valid: jax.Array, key: jax.Array):
  """Runs `local_steps` DP-SGD steps of one client from the global LoRA.

  Args:
    data: the client's examples, dict of [n_max, T] arrays.
    idx, valid: [S, Bmax] sampled indices and their mask.
    key: this client's noise key for this round; step s uses fold_in(key, s).

  Returns:
    (delta = local LoRA - global LoRA, per-client stats averaged over steps).
  """
  opt_state = tx.init(lora)

  def step(carry, xs):
    params, opt_state = carry
    s, step_idx, step_valid = xs
    batch = jax.tree.map(lambda a: jnp.take(a, step_idx, axis=0), data)
    grad, stats = privatized_gradient(graphdef, spec, params, frozen, batch, step_valid,
                                      jax.random.fold_in(key, s))
    updates, opt_state = tx.update(grad, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), stats

  (local, _), stats = jax.lax.scan(step, (lora, opt_state),
                                   (jnp.arange(spec.local_steps), idx, valid))
  delta = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), local, lora)
  count = jnp.maximum(jnp.sum(stats["count"]), 1)
  out = {"loss": jnp.sum(stats["loss_sum"]) / count,
         "clip_fraction": jnp.sum(stats["clipped"]) / count,
         "noise_norm": jnp.mean(stats["noise_norm"]),
         "signal_norm": jnp.mean(stats["signal_norm"]),
         "examples": jnp.sum(stats["count"])}
  return delta, out


ClientFn = Callable[..., tuple[PyTree, dict]]
