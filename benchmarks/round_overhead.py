"""DP overhead on the demo shape: non-private vs DP client step, compile time, memory, round time.

  python -m benchmarks.round_overhead [--model smollm2-135m-instruct] [--batch 8] [--seq 128]
      [--clients 1,2,4,8] [--repeats 3] [--answer-tokens 0]

--answer-tokens 0 (default): the loss covers the second half of every sequence (full-sequence
LM shape). --answer-tokens P: the demo workload, a loss on the last P tokens only, with the head
and softmax computed at those P positions (`dplora_jax.losses`) in both steps.

Prints a markdown table. Non-private step = jax.grad of the batch-mean loss (one backward pass);
DP step = vmap per-example gradients of the LoRA tree, per-example clipping, Gaussian noise, SGD.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from benchmarks import memory, workloads
from dplora_jax import lora as lora_lib
from dplora_jax.federated import round as round_lib
from dplora_jax.models import load_model


def _time(fn, *args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--microbatch", type=int, default=8)
  p.add_argument("--clients", default="1,2,4,8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--answer-tokens", type=int, default=0)
  args = p.parse_args()

  loaded = load_model(args.model, dtype=args.dtype, with_tokenizer=False)
  model = loaded.model
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=args.rank), jax.random.key(0))
  graphdef, lora, frozen = lora_lib.split(model)
  rng = np.random.default_rng(0)
  b, t = args.batch, args.seq
  batch = {"tokens": rng.integers(0, loaded.config.vocab_size, (b, t)).astype(np.int32),
           "mask": np.ones((b, t), bool)}
  batch["targets"] = np.roll(batch["tokens"], -1, axis=1)
  batch["loss_mask"] = np.zeros((b, t), bool)
  p_ans = args.answer_tokens
  batch["loss_mask"][:, (t - 1 - p_ans if p_ans else t // 2):(t - 1 if p_ans else t)] = True
  nonprivate_step, dp_step, spec = workloads.jax_steps(graphdef, b, args.microbatch, p_ans)
  tx = optax.sgd(0.1)
  np_first, np_time = _time(jax.jit(nonprivate_step), lora, frozen, batch, jax.random.key(1),
                            repeats=args.repeats)
  dp_first, dp_time = _time(jax.jit(dp_step), lora, frozen, batch, jax.random.key(1),
                            repeats=args.repeats)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, model {args.model}, "
        f"batch {b} x {t} tokens, loss on "
        f"{f'{p_ans} answer tokens (sparse head)' if p_ans else 'the second half'}, "
        f"LoRA r={args.rank} on q,k,v "
        f"({lora_lib.count_params(lora):,} params), dtype {args.dtype}\n")
  print("| step | compile+first (s) | step (s) | ratio to non-private |")
  print("|---|---|---|---|")
  print(f"| non-private (batch grad) | {np_first:.2f} | {np_time:.3f} | 1.00 |")
  print(f"| DP (vmap per-example, clip, noise) | {dp_first:.2f} | {dp_time:.3f} | "
        f"{dp_time / np_time:.2f} |")
  dev_peak = memory.device_peak_mib()
  print(f"\npeak host RSS {memory.peak_rss_mib():.0f} MiB"
        + ("" if dev_peak is None else f", device peak {dev_peak:.0f} MiB"))

  print("\n| clients | devices | round compile+first (s) | round (s) |")
  print("|---|---|---|---|")
  server_tx = round_lib.make_server_optimizer("fedavg", 1.0)
  for k in [int(x) for x in args.clients.split(",")]:
    n_dev = max(d for d in range(1, jax.device_count() + 1) if k % d == 0)
    mesh = round_lib.make_mesh(n_dev)
    step = round_lib.make_round_step(graphdef, spec, tx, server_tx, mesh)
    data = round_lib.shard_clients(mesh, {kk: np.stack([v] * k) for kk, v in batch.items()})
    idx = round_lib.shard_clients(mesh, np.tile(np.arange(b, dtype=np.int32), (k, 1, 1)))
    val = round_lib.shard_clients(mesh, np.ones((k, 1, b), bool))
    w = round_lib.shard_clients(mesh, np.ones((k,), np.float32))
    ids = round_lib.shard_clients(mesh, np.arange(k, dtype=np.int32))
    fz = round_lib.replicate(mesh, frozen)

    def once(state):
      return step(state, fz, data, idx, val, w, ids, jax.random.key(0))

    state = round_lib.replicate(mesh, round_lib.init_state(lora, server_tx))
    t0 = time.perf_counter()
    state, m = once(state)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, m = once(state)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    print(f"| {k} | {n_dev} | {first:.2f} | {np.median(times):.2f} |")


if __name__ == "__main__":
  main()
