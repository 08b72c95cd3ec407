"""Communication of federated LoRA: bytes per client per round vs the full model, for ranks and
FedAvg vs FFA, the paper's formula checked against the tensors that travel.

  python -m benchmarks.communication [--model smollm2-135m-instruct] [--ranks 4,8,16]
      [--targets q,k,v] [--rounds 6] [--clients 5]

Measured: the trainable LoRA tree a client uploads (and downloads), as float32 arrays and as the
safetensors bytes of those tensors. Formula (DP-LoRA, arXiv 2312.17493): each adapted W (d_in x
d_out) carries r (d_in + d_out) parameters (A and B); FFA freezes A, so only r d_out travel
(plus A once, down, before round 1). The paper writes L r 2n for n x n matrices; with grouped-query
attention k and v are d x d_kv, so r (d_in + d_out) is the exact count. Bytes per client per
round, float32. Prints one markdown table.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save

from dplora_jax import lora as lora_lib
from dplora_jax.metrics import tree_bytes
from dplora_jax.models import load_model


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def rows(model, ranks, targets, rounds, clients):
  full = tree_bytes(jax.tree.leaves(nnx.state(model)))
  out = []
  for rank in ranks:
    for agg in ("fedavg", "ffa"):
      m = nnx.clone(model)
      cfg = lora_lib.LoRAConfig(rank=rank, targets=tuple(targets), freeze_a=agg == "ffa")
      lora_lib.add_lora(m, cfg, jax.random.key(0))
      _, lora, _ = lora_lib.split(m)
      leaves = jax.tree.leaves(lora)
      measured = tree_bytes(leaves)
      wire = len(save({str(i): np.asarray(x) for i, x in enumerate(leaves)}))
      formula = square = 0
      for dense in lora_lib.adapted_denses(m).values():
        layers_, d_in, d_out = dense.kernel.shape  # scanned: [L, d_in, d_out]
        formula += 4 * layers_ * rank * (d_out if agg == "ffa" else d_in + d_out)
        square += 4 * layers_ * rank * (1 if agg == "ffa" else 2) * d_in  # the paper: n x n
      a_once = lora_lib.factor_bytes(m)["a"] if agg == "ffa" else 0
      total = 2 * measured * rounds * clients + a_once * clients
      out.append(dict(rank=rank, agg=agg, formula=formula, square=square, measured=measured,
                      wire=wire, full=full, total=total, a_once=a_once,
                      full_total=2 * full * rounds * clients))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--ranks", default="4,8,16")
  p.add_argument("--targets", default="q,k,v")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--clients", type=int, default=5)
  a = p.parse_args(argv)
  model = load_model(a.model, with_tokenizer=False).model
  rs = rows(model, [int(r) for r in a.ranks.split(",")], a.targets.split(","), a.rounds,
            a.clients)
  print(f"model {a.model}, LoRA on {a.targets}; totals: {a.rounds} rounds x {a.clients} clients, "
        "up + down (FFA: + A sent down once)\n")
  print("| rank | aggregation | paper's L r 2n (square W) | r (d_in + d_out) per W | measured "
        "(float32 tree) | safetensors bytes | share of the full model | total | total sending "
        "the full model |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rs:
    assert r["formula"] == r["measured"], r  # the paper's count is exactly what travels
    print(f"| {r['rank']} | {r['agg']} | {r['square']:,} | {r['formula']:,} | "
          f"{r['measured']:,} | {r['wire']:,} | {r['measured'] / r['full']:.3%} | "
          f"{_size(r['total'])} | {_size(r['full_total'])} |")


if __name__ == "__main__":
  main()
