"""One dplora_jax LoRA step (non-private or DP-SGD), timed in its own process; prints JSON.

  python -m benchmarks.jax_step --workload demo [--dp] [--batch 8] [--seq 128] [--rank 8]
      [--microbatch 8] [--remat] [--attention einsum|dot_product] [--dtype float32]
      [--param-dtype float32] [--model PATH|ALIAS|random:llama-1b]

Non-private: jax.grad of the batch-mean loss. DP: per-example gradients (vmap) in microbatches,
per-example clipping to C = 1 over the whole LoRA tree, Gaussian noise sigma = 1, divided by B
(`dplora_jax.federated.client.privatized_gradient`). Both then take an SGD step. Used by
`python -m benchmarks.compare`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np

from benchmarks import flops as flops_lib, memory, workloads
from dplora_jax import lora as lora_lib, models


def add_step_args(p):
  """The flags that choose the step (shared with `benchmarks.profile_step`)."""
  workloads.add_shape_args(p)
  p.add_argument("--microbatch", type=int, default=8)
  p.add_argument("--dtype", default="float32", help="the matmuls' dtype")
  p.add_argument("--param-dtype", default="float32", help="the frozen weights' storage dtype "
                 "(LoRA factors are always float32)")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--remat-policy", default="nothing", choices=("nothing", "dots"))
  p.add_argument("--attention", default="einsum")
  p.add_argument("--first-layer", type=int, default=0,
                 help="train LoRA on layers >= this one only (lora.first_layer)")
  p.add_argument("--cache-prefix", action="store_true",
                 help="with --first-layer: the step reads the frozen layers' output, computed "
                      "once before timing (model.cache_prefix)")


def build_step(args):
  """(the jitted step, its arguments, the loaded model) of `add_step_args`' flags."""
  if args.model.startswith("random:"):
    arch = workloads.random_model_config(args.model[len("random:"):], dtype=args.dtype,
                                         param_dtype=args.param_dtype)
    loaded = models.LoadedModel(models.build_model(arch), arch, None, args.model, "")
  else:
    loaded = models.load_model(args.model, dtype=args.dtype, param_dtype=args.param_dtype,
                               with_tokenizer=False)
  model = models.configure_execution(loaded.model, attention=args.attention, remat=args.remat,
                                     remat_policy=args.remat_policy)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=args.rank, first_layer=args.first_layer),
                    jax.random.key(0))
  graphdef, lora, frozen = lora_lib.split(model)
  batch = workloads.batch(args.workload, loaded.config.vocab_size, args.batch, args.seq)
  positions = 1 if args.workload == "demo" else 0  # the sparse head where the loss allows it
  if args.cache_prefix:
    if not args.first_layer:
      raise SystemExit("--cache-prefix needs --first-layer > 0")
    batch = dict(batch, hidden=jax.jit(functools.partial(lora_lib.frozen_prefix, graphdef))(
        lora, frozen, batch["tokens"], batch["mask"]))
  nonprivate, private, _ = workloads.jax_steps(graphdef, args.batch, args.microbatch, positions)
  return (jax.jit(private if args.dp else nonprivate), (lora, frozen, batch, jax.random.key(1)),
          loaded)


def main():
  p = argparse.ArgumentParser()
  add_step_args(p)
  args = p.parse_args()
  fn, inputs, loaded = build_step(args)
  b, t = args.batch, args.seq
  t0 = time.perf_counter()
  compiled = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
  useful = flops_lib.step_flops(loaded.config, b, t, workloads.head_positions(args.workload, t),
                                args.rank, first_layer=args.first_layer,
                                cached_prefix=args.cache_prefix)
  print(json.dumps({
      "impl": "jax", "dp": args.dp, "workload": args.workload, "step_s": float(np.median(times)),
      "first_layer": args.first_layer, "cache_prefix": args.cache_prefix,
      "compile_s": compile_s, "useful_flops": useful,
      "xla_flops": float((cost or {}).get("flops", float("nan"))),
      "peak_rss_mib": memory.peak_rss_mib(),
      "device_peak_mib": memory.device_peak_mib(),
      "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
  main()
