"""Useful FLOPs of a LoRA training step and the measured float32 matmul peak of this machine.

Useful FLOPs (analytic, matmuls only, as MFU is usually counted): the forward pass
2 * tokens * (q, k, v, o, gate, up, down weights) per layer + causal attention's two
T x T products (counted in full: every implementation here computes the masked half too) + the
LM head at the positions that reach it; the backward pass of a LoRA step needs activation
gradients through every frozen matmul (the same FLOPs again) but no frozen weight gradients;
LoRA's own matmuls (rank r) are added for forward, activation and weight gradients. The DP step's
clipping and noise are not counted (they are the overhead being measured).
"""

from __future__ import annotations

import time


def step_flops(cfg, batch: int, seq: int, head_positions: int, rank: int,
               targets=("q", "k", "v"), first_layer: int = 0, cached_prefix: bool = False
               ) -> float:
  """Useful FLOPs of one LoRA training step on `batch` x `seq` tokens (see module docstring).

  `cfg` is a dplora_jax ModelConfig; `head_positions` are the positions per example whose logits
  are computed (seq for a full-sequence loss). With `first_layer` s > 0 (`lora.first_layer`) the
  backward pass and LoRA's weight gradients cover layers s..L-1 only; with `cached_prefix` the
  forward pass does too (the frozen layers' output is read, not computed).
  """
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  shapes = {"q": (d, cfg.num_heads * hd), "k": (d, cfg.num_kv_heads * hd),
            "v": (d, cfg.num_kv_heads * hd), "o": (cfg.num_heads * hd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}
  if not 0 <= first_layer < cfg.num_layers:
    raise ValueError(f"first_layer={first_layer}; expected 0 <= it < {cfg.num_layers}.")
  tokens = batch * seq
  trained = cfg.num_layers - first_layer
  forward_layers = trained if cached_prefix else cfg.num_layers
  per_layer = sum(a * b for a, b in shapes.values())
  layer_fwd = 2 * tokens * per_layer + 2 * 2 * batch * seq * seq * cfg.num_heads * hd
  lora_layer_fwd = sum(2 * tokens * rank * (a + b) for n, (a, b) in shapes.items()
                       if n in targets)
  head_fwd = 2 * batch * head_positions * d * cfg.vocab_size
  forward = forward_layers * (layer_fwd + lora_layer_fwd) + head_fwd
  # backward: activation grads of the trained layers and the head (= their forward), weight
  # grads of their LoRA factors only (= LoRA's forward)
  backward = trained * (layer_fwd + 2 * lora_layer_fwd) + head_fwd
  return forward + backward


def matmul_peak_jax(sizes=((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)),
                    seconds: float = 2.0, dtype: str = "float32") -> float:
  """The best FLOP/s of XLA matmuls (default device) of the model's and a square shape."""
  import jax
  import jax.numpy as jnp
  best = 0.0
  for m, k, n in sizes:
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      f(a, b).block_until_ready()
      reps += 1
    best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
  return best


def matmul_peak_torch(sizes=((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)),
                      seconds: float = 2.0) -> float:
  """The same measurement with PyTorch's CPU matmul."""
  import torch
  best = 0.0
  with torch.no_grad():
    for m, k, n in sizes:
      a, b = torch.ones(m, k), torch.ones(k, n)
      a @ b
      reps, t0 = 0, time.perf_counter()
      while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
      best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
  return best


def model_matmul_shapes(cfg, tokens: int) -> dict[str, tuple[int, int, int]]:
  """(m, k, n) of the frozen matmuls one layer runs on `tokens` rows: forward (x W) and the
  activation backward (dY W^T), named by projection."""
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  fwd = {"q/o": (tokens, d, cfg.num_heads * hd), "k/v": (tokens, d, cfg.num_kv_heads * hd),
         "gate/up": (tokens, d, f), "down": (tokens, f, d)}
  out = {}
  for name, (m, k, n) in fwd.items():
    out[f"{name} fwd"] = (m, k, n)
    out[f"{name} bwd"] = (m, n, k)
  return out


def main():
  """Prints the float32 matmul FLOP/s XLA reaches on this machine for the model's own shapes
  (the attainable peak of a step) next to the square 2048^3 peak.

    python -m benchmarks.flops [--model smollm2-135m-instruct] [--tokens 1024]
  """
  import argparse
  from dplora_jax.models import load_model
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--tokens", type=int, default=1024, help="rows per matmul (batch x seq)")
  args = p.parse_args()
  cfg = load_model(args.model, with_tokenizer=False).config
  shapes = {"square 2048^3": (2048, 2048, 2048), **model_matmul_shapes(cfg, args.tokens)}
  print("| matmul | m x k x n | XLA GFLOP/s |")
  print("|---|---|---|")
  for name, mkn in shapes.items():
    print(f"| {name} | {' x '.join(map(str, mkn))} | "
          f"{matmul_peak_jax((mkn,), seconds=1.0) / 1e9:.0f} |")


if __name__ == "__main__":
  main()
