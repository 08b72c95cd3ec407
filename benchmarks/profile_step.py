"""Where one step's time goes: a `jax.profiler` trace of the compiled step, grouped by HLO op.

  python -m benchmarks.profile_step --workload demo [--dp] [--batch 8] [--seq 128] [--rank 8]
      [--microbatch 8] [--remat] [--attention einsum|dot_product] [--top 15] [--json FILE]
      (the step flags of benchmarks.jax_step)

XLA:CPU records one trace event per executed thunk, named by its HLO instruction; the script
takes each event's self time (nested events subtracted, per thread), looks the instruction up in
the compiled module's text, and prints (1) the time per kind of work (matmuls, elementwise
fusions, copies and slices, reductions, ...) as a share of the summed thunk time, with the matmuls'
FLOP/s from their HLO shapes, and (2) the most expensive instructions with the JAX operation that
produced them. Thunks run on two threads at once at most here, so shares are of CPU time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks import jax_step

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\((.*)$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
# event names that are runtime bookkeeping, not HLO thunks
_RUNTIME = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjitFunction", "CommonPjRt", "Allocate",
            "Handle ", "ParseArguments", "PythonRefManager", "Wait for", "ThreadpoolListener",
            "end: ")


def parse_hlo(text: str) -> dict:
  """{instruction name: {opcode, shape, kind, calls, op_name, dims, operands}} of every
  computation of an HLO module's text."""
  out, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      current = line.split()[0] if not line.startswith("ENTRY") else line.split()[1]
      current = current.lstrip("%")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    meta = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    kind = re.search(r'"kind":"(\w+)"', rest) or re.search(r"kind=(k\w+)", rest)
    out[name] = {"opcode": opcode, "shape": shape, "rest": rest, "comp": current,
                 "calls": calls.group(1) if calls else None,
                 "kind": kind.group(1) if kind else "",
                 "op_name": meta.group(1) if meta else ""}
    comps[current].append(name)
  for info in out.values():
    info["inner"] = [out[n]["opcode"] for n in comps.get(info["calls"], [])]
  return out


def _dims(shape: str) -> list[int]:
  m = _SHAPE.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def dot_flops(info: dict, hlo: dict) -> float:
  """FLOPs of a dot (or of the dots inside a fusion): 2 x output elements x contracted size."""
  if info["opcode"] != "dot":
    return sum(dot_flops(hlo[n], hlo) for n, i in hlo.items()
               if i["comp"] == info["calls"] and i["opcode"] == "dot") if info["calls"] else 0.0
  operands = re.findall(r"%([\w.\-]+)", info["rest"].split(")")[0])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", info["rest"])
  if not operands or operands[0] not in hlo or not contracting:
    return 0.0
  lhs = _dims(hlo[operands[0]]["shape"])
  k = int(np.prod([lhs[int(i)] for i in contracting.group(1).split(",") if i]))
  return 2.0 * float(np.prod(_dims(info["shape"]))) * k


def category(info: dict) -> str:
  inner = set(info["inner"])
  if info["opcode"] == "dot" or "dot" in inner:
    return "matmul"
  if info["opcode"] in ("copy", "transpose") or inner <= {"copy", "transpose", "bitcast",
                                                           "parameter"} and inner:
    return "copy / transpose"
  if info["opcode"] in ("dynamic-slice", "dynamic-update-slice", "slice", "concatenate",
                        "pad", "gather", "scatter") or inner & {"dynamic-slice",
                                                                 "dynamic-update-slice",
                                                                 "gather", "scatter"}:
    return "slice / update / gather"
  if info["opcode"] == "reduce" or "reduce" in inner:
    return "reduction"
  if info["opcode"] == "broadcast" or inner <= {"broadcast", "constant", "parameter"} and inner:
    return "broadcast / fill"
  if info["opcode"] == "fusion" and info["inner"]:
    return "elementwise fusion"
  if info["opcode"] in ("rng-bit-generator", "custom-call"):
    return info["opcode"]
  return "other: " + info["opcode"]


def self_times(events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
  """(self time in us, number of events) per event name: each thread's nested events subtracted
  from their parent's time."""
  by_tid = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      by_tid[(e.get("pid"), e.get("tid"))].append(e)
  out, calls = collections.Counter(), collections.Counter()
  for evs in by_tid.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [end, name, child time]
    for e in evs:
      while stack and e["ts"] >= stack[-1][0]:
        end, name, child, dur = stack.pop()
        out[name] += dur - child
      if stack:
        stack[-1][2] += e["dur"]
      stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
      calls[e["name"]] += 1
    while stack:
      end, name, child, dur = stack.pop()
      out[name] += dur - child
  return out, calls


def profile(compiled, args_, repeats: int = 1):
  """(self time per event name, event count per name, both summed over `repeats` traced calls;
  wall seconds per call)."""
  jax.block_until_ready(compiled(*args_))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        jax.block_until_ready(compiled(*args_))
    wall = (time.perf_counter() - t0) / repeats
    [path] = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return (*self_times(events), wall)


def report(times: collections.Counter, calls: collections.Counter, hlo: dict, repeats: int,
           top: int) -> dict:
  """Prints the tables; returns them as a dict."""
  thunks = {n: t / repeats / 1e6 for n, t in times.items()
            if not n.startswith(_RUNTIME) and n in hlo}
  total = sum(thunks.values())
  cats = collections.defaultdict(lambda: [0.0, 0.0])
  for n, t in thunks.items():
    c = cats[category(hlo[n])]
    c[0] += t
    c[1] += dot_flops(hlo[n], hlo) * calls[n] / repeats
  print(f"thunk CPU time per step: {total:.3f} s\n")
  print("| kind | s per step | share | GFLOP/s |\n|---|---|---|---|")
  for c, (t, f) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
    rate = f"{f / t / 1e9:.0f}" if f and t else ""
    print(f"| {c} | {t:.3f} | {t / total:.0%} | {rate} |")
  print("\n| instruction | kind | shape | s per step | share | GFLOP/s | from |\n"
        "|---|---|---|---|---|---|---|")
  rows = []
  for n, t in sorted(thunks.items(), key=lambda kv: -kv[1])[:top]:
    info = hlo[n]
    src = info["op_name"].split("/")[-2:] if info["op_name"] else [""]
    f = dot_flops(info, hlo) * calls[n] / repeats
    rate = f"{f / t / 1e9:.0f}" if f and t else ""
    print(f"| {n} | {category(info)} | {info['shape']} | {t:.3f} | {t / total:.1%} | {rate} | "
          f"{'/'.join(src)} |")
    rows.append({"name": n, "category": category(info), "shape": info["shape"], "seconds": t,
                 "op_name": info["op_name"]})
  return {"thunk_seconds": total, "categories": {c: v[0] for c, v in cats.items()},
          "matmul_flops": cats["matmul"][1] if "matmul" in cats else 0.0, "top": rows}


def main():
  p = argparse.ArgumentParser()
  jax_step.add_step_args(p)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--json", default=None)
  args = p.parse_args()
  fn, inputs, _ = jax_step.build_step(args)
  compiled = fn.lower(*inputs).compile()
  hlo = parse_hlo(compiled.as_text())
  times, calls, wall = profile(compiled, inputs, args.repeats)
  print(f"step wall time (traced): {wall:.3f} s")
  out = report(times, calls, hlo, args.repeats, args.top)
  out.update(wall_seconds=wall, workload=args.workload, dp=args.dp)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
