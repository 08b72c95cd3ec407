"""Per-device memory of a config's round, before any weight is loaded (the round compiled ahead
of time from shapes; XLA's memory analysis).

  python -m launch.plan --config configs/llama2_7b_fin.py:path=/models/Llama-2-7b-hf \\
      --devices 8 --device_memory_gb 80
  python -m launch.plan --config configs/tiny.py --microbatch 4 --json plan.json

Prints one row per plan: microbatch, physical batch, mesh, clients per device, and GiB per device
of arguments (frozen slice, examples, LoRA state), outputs, temporaries and their total. With
--device_memory_gb it tries microbatch 1, 2, 4, ... and names the largest that fits. Run it on the
target machine for exact numbers (it needs the backend, not the memory); on CPU, --devices fakes
that many CPU devices, and XLA:CPU computes bfloat16 matmuls in float32, which inflates the
temporaries of a bfloat16 model. Bad input: one `error:` line, exit 2 (--debug: traceback).
"""

import argparse
import dataclasses
import json
import sys

from launch import cli

GIB = 2 ** 30


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.OVERRIDE_HELP)
  p.add_argument("--config", required=True, help="config file[:args]")
  p.add_argument("--devices", type=int, help="devices of the mesh (default: all; on CPU, fakes "
                                             "this many)")
  p.add_argument("--microbatch", type=int, help="plan this microbatch (default: the config's)")
  p.add_argument("--clients_per_device", type=int, help="default: ceil(clients / groups)")
  p.add_argument("--device_memory_gb", type=float,
                 help="find the largest power-of-two microbatch whose round fits in this memory")
  p.add_argument("--json", help="also write the plans to this JSON file")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, overrides = cli.split_overrides(argv)
  args = p.parse_args(rest)
  for name in ("devices", "microbatch", "clients_per_device"):
    v = getattr(args, name)
    if v is not None and v < 1:
      p.error(f"--{name}={v} must be >= 1.")
  if args.device_memory_gb is not None and args.device_memory_gb <= 0:
    p.error(f"--device_memory_gb={args.device_memory_gb} must be > 0.")
  return args, overrides


def _row(p) -> str:
  mesh = "x".join(f"{k} {v}" for k, v in p.mesh.items())
  return (f"| {p.microbatch} | {p.max_batch} | {mesh} | {p.clients_per_device} | "
          f"{p.frozen_bytes / GIB:.2f} | {p.argument_bytes / GIB:.2f} | "
          f"{p.output_bytes / GIB:.2f} | {p.temp_bytes / GIB:.2f} | {p.total_bytes / GIB:.2f} | "
          f"{p.lora_dtype} | {p.compile_seconds:.1f} |")


def main(argv=None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  import jax
  if args.devices and jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
  from dplora_jax import memory_plan
  cfg = cli.load_config(args.config, overrides)
  kw = {"num_devices": args.devices, "clients_per_device": args.clients_per_device}
  if args.device_memory_gb:
    best, plans = memory_plan.fit(cfg, int(args.device_memory_gb * GIB), **kw)
  else:
    best, plans = None, [memory_plan.plan_round(cfg, microbatch=args.microbatch, **kw)]
  print("| microbatch | Bmax | mesh | clients/device | frozen GiB | arguments GiB | outputs GiB "
        "| temporaries GiB | total GiB | LoRA | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for p in plans:
    print(_row(p))
  if args.device_memory_gb:
    print(f"largest microbatch within {args.device_memory_gb:g} GiB: "
          f"{best.microbatch if best else 'none (even microbatch 1 does not fit)'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"plans": [dict(dataclasses.asdict(p), total_bytes=p.total_bytes)
                           for p in plans],
                 "fits": best.microbatch if best else None}, f, indent=2)
  return 0


if __name__ == "__main__":
  cli.run(main)
