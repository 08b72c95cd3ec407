"""A tiny random Llama with LoRA and synthetic client data, for fast mechanism tests."""

import jax
import numpy as np

from dplora_jax import lora as lora_lib
from dplora_jax.models import ModelConfig, build_model

ARCH = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8, intermediate_size=24)
T = 12


def model_and_lora(rank=2, seed=0, perturb=True):
  model = build_model(ARCH, seed=seed)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=rank), jax.random.key(seed))
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
