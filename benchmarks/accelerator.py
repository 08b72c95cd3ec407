"""The accelerator goal of issue 11: a bfloat16 DP step with float32 LoRA, its MFU and its ratio to
the non-private step, on SmolLM2-135M's shape and a 1B-class (Llama-3.2-1B-shaped) Llama, both
random-init by default (the device machine holds no model files; SmolLM2's GGUF is 98 MB).

  python -m benchmarks.accelerator [--models random:smollm2-135m,random:llama-1b]
      [--workload full] [--batch 16] [--seq 512] [--rank 8] [--microbatch 16] [--repeats 5]
      [--peak-tflops X] [--json out.json]

One process per row (`benchmarks.jax_step`: nothing warmed up or shared across rows), each row
the median of `--repeats` steps after a warm-up. The frozen base is stored and multiplied in
bfloat16 (`--param-dtype bfloat16 --dtype bfloat16`); LoRA factors, their gradients, clipping and
noise stay float32. MFU is the analytic useful FLOPs (`benchmarks.flops.step_flops`: matmuls only,
no frozen weight gradients, the DP clip and noise not counted) per second over the device's
nominal dense bfloat16 peak (`--peak-tflops`, or `NOMINAL_BF16_TFLOPS` by device kind); the
share of the bfloat16 matmul peak measured in the same run is printed beside it. On a CPU it runs
too (`--models random:tiny --seq 64` as a smoke check), without a nominal peak.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.compare import run_json

# Dense bfloat16 tensor-core peaks from the vendors' data sheets (no sparsity), TFLOP/s.
NOMINAL_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4,
                       "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0,
                       "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0}


def measured_peak(seconds: float = 2.0) -> dict:
  """{device, bf16 matmul FLOP/s} of the default device, in a process of its own."""
  big = "((8192, 8192, 8192), (4096, 4096, 4096))"
  code = ("import json, jax; from benchmarks import flops; cpu = jax.devices()[0].platform == "
          f"'cpu'; sizes = ((1024, 1024, 1024),) if cpu else {big}; "
          "print(json.dumps({'device': jax.devices()[0].device_kind, 'peak': "
          f"flops.matmul_peak_jax(sizes, seconds={seconds}, dtype='bfloat16')}}))")
  return run_json(["-c", code], timeout=600)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="random:smollm2-135m,random:llama-1b",
                 help="comma-separated; random:NAME needs no weights (the step's cost depends "
                      "on the shapes only), a path or alias loads real weights")
  p.add_argument("--workload", default="full", choices=("demo", "full"))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--microbatch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--attention", default="dot_product", help="cuDNN flash attention on GPU")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="nominal dense bfloat16 peak; default: NOMINAL_BF16_TFLOPS by device")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
  p.add_argument("--json", default="", help="also write the rows here")
  args = p.parse_args()
  peak = measured_peak()
  device = peak.get("device", "?")
  nominal = args.peak_tflops * 1e12 or NOMINAL_BF16_TFLOPS.get(device, 0.0) * 1e12
  print(f"{device}: bfloat16 base, float32 LoRA r={args.rank} on q,k,v, {args.workload} loss, "
        f"batch {args.batch} x {args.seq}, microbatch {args.microbatch}, attention "
        f"{args.attention}. bfloat16 matmul peak measured here: "
        f"{peak.get('peak', float('nan')) / 1e12:.1f} TFLOP/s"
        + (f"; nominal {nominal / 1e12:.1f}" if nominal else "; no nominal peak known") + ".\n")
  print("| model | step | step (s) | vs non-private | useful TFLOP/s | MFU (nominal) | "
        "share of measured peak | device peak (MiB) | compile (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for model in args.models.split(","):
    base = None
    for dp in (False, True):
      flags = ["-m", "benchmarks.jax_step", "--model", model, "--workload", args.workload,
               "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
               "--microbatch", str(args.microbatch), "--repeats", str(args.repeats),
               "--dtype", "bfloat16", "--param-dtype", "bfloat16", "--attention",
               args.attention] + (["--dp"] if dp else [])
      r = dict(run_json(flags, args.timeout), model=model, dp=dp)
      rows.append(r)
      name = "DP" if dp else "non-private"
      if "error" in r:
        print(f"| {model} | {name} | failed: {r['error'][:100]} | | | | | | |")
        continue
      base = r["step_s"] if not dp else base
      fl = r["useful_flops"] / r["step_s"]
      ratio = f"{r['step_s'] / base:.2f}" if base else "-"
      mfu = f"{fl / nominal:.1%}" if nominal else "-"
      share = f"{fl / peak['peak']:.1%}" if peak.get("peak") else "-"
      mem = f"{r['device_peak_mib']:.0f}" if r.get("device_peak_mib") is not None else "-"
      print(f"| {model} | {name} | {r['step_s']:.4f} | {ratio} | {fl / 1e12:.2f} | {mfu} | "
            f"{share} | {mem} | {r['compile_s']:.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "measured_peak": peak.get("peak"), "nominal_peak": nominal,
                 "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
