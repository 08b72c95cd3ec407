"""dplora_jax against PyTorch + PEFT and Opacus, side by side in one run; prints one table.

  pip install -e .[bench]
  python -m benchmarks.compare [--batch 8] [--seq 128] [--rank 8] [--workloads demo,full]
      [--repeats 3] [--skip-peers]

Each row runs in its own process (peak RSS is per row; nothing is shared or warmed up across
rows): JAX non-private, JAX DP (`benchmarks.jax_step`), PyTorch non-private, Opacus DP
(`benchmarks.peer_torch`), for the demo workload (prompt + answer-token loss, head at the answer
only) and the full-sequence LM loss (`benchmarks.workloads`). Useful FLOP/s is the analytic
count of `benchmarks.flops.step_flops` over the median step time; the peak is the best float32
matmul FLOP/s measured here with XLA and with PyTorch (the larger is the denominator).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_json(argv: list[str], timeout: float = 1800.0) -> dict:
  """Runs `python argv...` in its own process; its last stdout line as JSON, or {"error": ...}
  (the last stderr line, or the timeout)."""
  try:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  if out.returncode:
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _run(module: str, *args: str) -> dict:
  return run_json(["-m", module, *args])


def _peaks() -> dict:
  code = ("import json; from benchmarks import flops; "
          "print(json.dumps({'jax': flops.matmul_peak_jax(), 'torch': %s}))")
  out = {}
  for torch in ("flops.matmul_peak_torch()", "None"):
    r = subprocess.run([sys.executable, "-c", code % torch], capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 0:
      out = json.loads(r.stdout.strip().splitlines()[-1])
      break
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workloads", default="demo,full")
  p.add_argument("--skip-peers", action="store_true", help="JAX rows only (no torch installed)")
  p.add_argument("--jax-args", default="", help="extra flags for benchmarks.jax_step")
  args = p.parse_args()
  shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
           "--repeats", str(args.repeats)]
  peaks = _peaks()
  peak = max(v for v in peaks.values() if v) if peaks else float("nan")
  print(f"SmolLM2-135M-Instruct, batch {args.batch} x {args.seq} tokens, LoRA r={args.rank} on "
        f"q,k,v, float32. Measured float32 matmul peak: XLA {peaks.get('jax', 0) / 1e9:.0f}, "
        f"PyTorch {(peaks.get('torch') or 0) / 1e9:.0f} GFLOP/s.\n")
  print("| workload | step | step (s) | vs JAX non-private | vs Opacus DP | useful GFLOP/s | "
        "share of peak | peak RSS (MiB) | compile / first step (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for w in args.workloads.split(","):
    rows = [("JAX non-private", "benchmarks.jax_step", []),
            ("JAX DP", "benchmarks.jax_step", ["--dp"])]
    if not args.skip_peers:
      rows += [("PyTorch+PEFT non-private", "benchmarks.peer_torch", []),
               ("Opacus+PEFT DP", "benchmarks.peer_torch", ["--dp"])]
    extra = args.jax_args.split() if args.jax_args else []
    res = {name: _run(mod, "--workload", w, *shape, *flags,
                      *(extra if mod == "benchmarks.jax_step" else []))
           for name, mod, flags in rows}
    base = res["JAX non-private"].get("step_s")
    opacus = res.get("Opacus+PEFT DP", {}).get("step_s")
    for name, r in res.items():
      if "error" in r:
        print(f"| {w} | {name} | failed: {r['error'][:80]} | | | | | | |")
        continue
      fl = r["useful_flops"] / r["step_s"]
      print(f"| {w} | {name} | {r['step_s']:.3f} | {r['step_s'] / base:.2f} | "
            + (f"{r['step_s'] / opacus:.2f}" if opacus else "-")
            + f" | {fl / 1e9:.0f} | {fl / peak:.0%} | {r['peak_rss_mib']:.0f} | "
            f"{r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
