"""The peer: PyTorch + PEFT LoRA, non-private or with Opacus DP-SGD, on exactly our shape and
loss (`benchmarks.workloads`), timed in its own process; prints JSON.

  pip install -e .[bench]     # torch, transformers, peft, opacus (never a library dependency)
  python -m benchmarks.peer_torch --workload demo [--dp] [--batch 8] [--seq 128] [--rank 8]

The model is the same SmolLM2 GGUF file, dequantised to float32 by transformers. LoRA r on
q_proj, k_proj, v_proj. The demo workload computes the LM head at the answer position only (as
ours does): hidden states from the base model, gathered, then lm_head. DP: Opacus 1.6
GradSampleModule (per-sample gradients by hooks) + DPOptimizer, clip 1, noise multiplier 1,
expected batch B; both steps are SGD. Used by `python -m benchmarks.compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import types
import warnings

import numpy as np

from benchmarks import flops as flops_lib, workloads


def main():
  p = argparse.ArgumentParser()
  workloads.add_shape_args(p)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
  args = p.parse_args()
  warnings.filterwarnings("ignore")

  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  from dplora_jax.models import resolve_path
  if args.threads:
    torch.set_num_threads(args.threads)
  path = resolve_path(args.model)
  folder, name = os.path.split(path)
  base = (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
          if path.endswith(".gguf") else
          AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
  model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                          target_modules=["q_proj", "k_proj", "v_proj"]))
  model.train()
  b, t = args.batch, args.seq
  data = workloads.batch(args.workload, base.config.vocab_size, b, t)
  tokens = torch.from_numpy(data["tokens"]).long()
  targets = torch.from_numpy(data["targets"]).long()
  loss_mask = torch.from_numpy(data["loss_mask"])
  pos = int(np.flatnonzero(data["loss_mask"][0])[0]) if args.workload == "demo" else None

  class Loss(torch.nn.Module):
    """Per-example mean NLL over the loss positions (a module so Opacus sees one forward)."""

    def __init__(self, peft_model):
      super().__init__()
      self.m = peft_model

    def forward(self, tokens):
      inner = self.m.base_model.model  # LlamaForCausalLM with LoRA-wrapped projections
      if pos is not None:  # the head at the answer position only
        h = inner.model(input_ids=tokens).last_hidden_state[:, pos:pos + 1]
        logits = inner.lm_head(h).float()
        return -torch.log_softmax(logits, -1)[:, 0].gather(1, targets[:, pos:pos + 1])[:, 0]
      logits = inner(input_ids=tokens).logits.float()
      nll = -torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]
      w = loss_mask.float()
      return (nll * w).sum(1) / w.sum(1)

  net = Loss(model)
  params = [q for q in net.parameters() if q.requires_grad]
  opt = torch.optim.SGD(params, lr=0.1)
  if args.dp:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    net = GradSampleModule(net)
    opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=b)

  def step():
    opt.zero_grad(set_to_none=True)
    net(tokens).mean().backward()
    opt.step()

  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  c = base.config  # the analytic count of the same architecture
  arch = types.SimpleNamespace(
      hidden_size=c.hidden_size, head_dim=c.hidden_size // c.num_attention_heads,
      intermediate_size=c.intermediate_size, num_heads=c.num_attention_heads,
      num_kv_heads=c.num_key_value_heads, num_layers=c.num_hidden_layers,
      vocab_size=c.vocab_size)
  useful = flops_lib.step_flops(arch, b, t, workloads.head_positions(args.workload, t), args.rank)
  print(json.dumps({
      "impl": "torch", "dp": args.dp, "workload": args.workload,
      "step_s": float(np.median(times)), "compile_s": first_s, "useful_flops": useful,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "device": f"cpu x{torch.get_num_threads()} threads",
      "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                   **({"opacus": __import__("opacus").__version__} if args.dp else {})}}))


if __name__ == "__main__":
  main()
