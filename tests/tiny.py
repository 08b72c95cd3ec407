"""A tiny random Llama with LoRA and synthetic client data, for fast mechanism tests."""

import functools

import jax
import numpy as np

from dplora_jax import lora as lora_lib
from dplora_jax.federated import client as client_lib
from dplora_jax.models import ModelConfig, build_model

ARCH = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8, intermediate_size=24)
T = 12


def model_and_lora(rank=2, seed=0, perturb=True, freeze_a=False, first_layer=0):
  model = build_model(ARCH, seed=seed)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=rank, freeze_a=freeze_a,
                                               first_layer=first_layer), jax.random.key(seed))
  graphdef, lora, frozen = lora_lib.split(model)
  if perturb:  # nonzero B so every factor gets a gradient
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    lora = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return graphdef, lora, frozen


def examples(n, seed=0):
  """dict of [n, T] arrays: random tokens, the last 3 positions are the 'response'."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, ARCH.vocab_size, (n, T)).astype(np.int32)
  lengths = rng.integers(6, T + 1, n)
  mask = np.arange(T)[None] < lengths[:, None]
  targets = np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
  loss_mask = (np.arange(T)[None] >= (lengths - 4)[:, None]) & (np.arange(T)[None] < (lengths - 1)[:, None])
  return {"tokens": tokens, "mask": mask, "targets": targets, "loss_mask": loss_mask}


def client_data(num_clients, n, seed=0):
  per = [examples(n, seed + k) for k in range(num_clients)]
  return {key: np.stack([p[key] for p in per]) for key in per[0]}


def client_spec(mechanism="sample", *, clip=0.1, sigma=1.0, divisor=3, microbatch=2, steps=1,
                paper_noise_std=0.0, diagnostics=False):
  """A ClientSpec with the named mechanism ("sample", "paper" or "none")."""
  from dplora_jax.dp.mechanisms import DPSGD, PaperGroups
  from dplora_jax.federated import client as client_lib
  return client_lib.ClientSpec(
      microbatch=microbatch, local_steps=steps,
      dpsgd=DPSGD(clip, sigma, float(divisor)) if mechanism == "sample" else None,
      paper=PaperGroups(clip, paper_noise_std) if mechanism == "paper" else None,
      diagnostics=diagnostics)


def round_setup(num_clients=8, n=6, steps=1, bmax=4, mechanism="sample", sigma=1.0, clip=0.1,
                lr=0.5, devices=1, weights=None, client_dp=None, client_clip=0.0, freeze_a=False,
                paper_noise_std=0.0, seed=0, diagnostics=False, first_layer=0, noise_at="client"):
  """A compiled round on the tiny model with random samples: (step, state, args, extras);
  noise_at='server': the aggregator noises the clients' clipped sums (CentralDPSGD(spec.dpsgd,
  lr))."""
  import optax
  from dplora_jax.federated import round as round_lib
  import dataclasses
  graphdef, lora, frozen = model_and_lora(freeze_a=freeze_a, first_layer=first_layer)
  spec = dataclasses.replace(
      client_spec(mechanism, clip=clip, sigma=sigma, divisor=3, microbatch=2, steps=steps,
                  paper_noise_std=paper_noise_std, diagnostics=diagnostics),
      first_layer=first_layer, noise_at=noise_at)
  central = None
  if noise_at == "server":
    from dplora_jax.dp.mechanisms import CentralDPSGD
    central = CentralDPSGD(spec.dpsgd, lr)
  mesh = round_lib.make_mesh(devices)
  server_tx = round_lib.make_server_optimizer("fedavg", 1.0)
  step = round_lib.make_round_step(graphdef, spec, optax.sgd(lr), server_tx, mesh, client_dp,
                                   central=central)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, (num_clients, steps, bmax)).astype(np.int32)
  valid = rng.random((num_clients, steps, bmax)) < 0.7
  w = np.ones(num_clients, np.float32) if weights is None else np.asarray(weights, np.float32)
  args = dict(frozen=round_lib.replicate(mesh, frozen),
              data=round_lib.shard_clients(mesh, client_data(num_clients, n)),
              idx=round_lib.shard_clients(mesh, idx), valid=round_lib.shard_clients(mesh, valid),
              weights=round_lib.shard_clients(mesh, w),
              client_ids=round_lib.shard_clients(mesh, np.arange(num_clients, dtype=np.int32)),
              noise_key=jax.random.key(42))
  state = round_lib.replicate(mesh, round_lib.init_state(lora, server_tx, client_clip))
  return step, state, args, (graphdef, lora, frozen, spec)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


FIELDS = ("tokens", "mask", "targets", "loss_mask")


@functools.partial(jax.jit, static_argnums=0)
def example_grad(graphdef, lora, frozen, tokens, mask, targets, loss_mask):
  """The LoRA gradient of one example's loss (compiled once: reference loops stay fast)."""
  return jax.grad(client_lib.example_loss, argnums=1)(graphdef, lora, frozen, tokens, mask,
                                                      targets, loss_mask)


@functools.partial(jax.jit, static_argnums=0)
def mean_grad(graphdef, lora, frozen, batch):
  """The LoRA gradient of the batch-mean loss over the rows of `batch` (dict of [n, T])."""

  def loss(l):
    per = jax.vmap(client_lib.example_loss, in_axes=(None, None, None, 0, 0, 0, 0))(
        graphdef, l, frozen, *(batch[f] for f in FIELDS))
    return per.mean()

  return jax.grad(loss)(lora)
