"""The accountant as a command, for planning runs (dp-accounting underneath).

  # eps of T Poisson-sampled Gaussian steps
  python -m launch.privacy --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 --delta 1e-5
  # the sigma that reaches a target eps
  python -m launch.privacy --target-epsilon 8 --sampling-rate 0.01 --steps 1000 --delta 1e-5
  # the full privacy plan of a config (every mechanism: unit, q, releases, sigma, eps, delta)
  python -m launch.privacy --config configs/demo.py

The last line of output is the number asked for (eps, sigma, or with --config the eps of each
mechanism in plan order, space-separated). --json prints one JSON object instead.
"""

import argparse
import sys
import json

from dplora_jax import build, config as config_lib, config_files
from dplora_jax.dp import accounting, plan as plan_lib
from launch import cli


def parse(argv):
  p = argparse.ArgumentParser(epilog=cli.OVERRIDE_HELP, prog="python -m launch.privacy", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="a config file, optionally with :args (configs/tiny.py:eps=2)")
  p.add_argument("--noise-multiplier", type=float, help="sigma (noise std / L2 sensitivity)")
  p.add_argument("--target-epsilon", type=float, help="calibrate sigma to this eps instead")
  p.add_argument("--sampling-rate", type=float, help="Poisson sampling rate q in (0, 1]")
  p.add_argument("--steps", type=int, help="number of composed steps T >= 1")
  p.add_argument("--delta", type=float, help="delta in (0, 1)")
  p.add_argument("--accountant", choices=["rdp", "pld"], default=None,
                 help="rdp (default) or pld")
  p.add_argument("--rdp-orders", choices=sorted(accounting.ORDER_PRESETS), default="default",
                 help="RDP order grid (opacus / tf_privacy reproduce their published numbers)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, args_overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  args = p.parse_args(rest)
  args.overrides = args_overrides
  mech = ("noise_multiplier", "target_epsilon", "sampling_rate", "steps", "delta")
  if args.config:
    given = [f"--{m.replace('_', '-')}" for m in mech if getattr(args, m) is not None]
    if given or args.rdp_orders != "default":
      p.error(f"--config plans from the config file; it contradicts {given or ['--rdp-orders']} "
              "(set those in the config instead).")
    return args
  if (args.noise_multiplier is None) == (args.target_epsilon is None):
    p.error("give exactly one of --noise-multiplier (prints eps) and --target-epsilon (prints "
            "sigma), or --config.")
  missing = [f"--{m.replace('_', '-')}" for m in ("sampling_rate", "steps", "delta")
             if getattr(args, m) is None]
  if missing:
    p.error(f"missing {', '.join(missing)}.")
  if not 0 < args.sampling_rate <= 1:
    p.error(f"--sampling-rate={args.sampling_rate} must be in (0, 1].")
  if args.steps < 1:
    p.error(f"--steps={args.steps} must be >= 1.")
  if not 0 < args.delta < 1:
    p.error(f"--delta={args.delta} must be in (0, 1).")
  if args.noise_multiplier is not None and not args.noise_multiplier > 0:
    p.error(f"--noise-multiplier={args.noise_multiplier} must be > 0.")
  if args.target_epsilon is not None and not args.target_epsilon > 0:
    p.error(f"--target-epsilon={args.target_epsilon} must be > 0.")
  if args.accountant == "pld" and args.rdp_orders != "default":
    p.error("--rdp-orders applies to --accountant rdp only.")
  return args


def main(argv=None) -> int:
  args = parse(argv)
  kind = args.accountant or "rdp"
  if args.config:
    cfg = config_files.load_with_overrides(args.config, args.overrides)
    if args.accountant and args.accountant != cfg.dp.accountant:
      cfg = config_lib.dataclasses.replace(
          cfg, dp=config_lib.dataclasses.replace(cfg.dp, accountant=args.accountant))
    plan = build.privacy_plan(cfg)
    if args.json:
      print(json.dumps({"config": args.config, "mode": cfg.dp.mode, **plan.to_dict()}))
      return 0
    print(f"privacy plan of {args.config} (dp.mode = {cfg.dp.mode!r}); from public values only: "
          f"{', '.join(f'{k} = {v}' for k, v in plan.public.items())}")
    if not plan.mechanisms:
      print("no privacy mechanism (dp.mode = 'none'): eps = inf")
      print("inf")
      return 0
    for m in plan.mechanisms:
      print(f"[{m.name}] unit: {m.unit}")
      print(f"  q = {m.sampling_rate:.6g}, releases = {m.releases_per_round} x {m.rounds} rounds, "
            f"noise multiplier = {m.noise_multiplier:.6g}, accountant = {m.accountant}")
      print(f"  eps = {m.epsilon:.6g}, delta = {m.delta:.6g}")
      for g in m.prior:
        what = ("the LoRA centre's release before round 1" if g.source == "lora centre"
                else f"an earlier segment ({g.source})")
        print(f"  includes {what}: {g.releases} Gaussian release(s) at q = {g.sampling_rate:.4g}, "
              f"noise multiplier = {g.noise_multiplier:.6g}")
      if m.name == "example":
        d = m.details
        how = ("accounted (truncated-Poisson PLD event)" if d["truncation"] == "accounted"
               else f"charged delta {d['truncation_delta']:.3g}")
        print(f"  physical batch {d['max_batch']} (expected {d['expected_batch']}), over-full "
              f"samples cut: {how}")
        if d.get("noise_at") == "server":
          centred = any(g.source == "lora centre" for g in m.prior)
          print("  noise added once by a TRUSTED aggregator (dp.noise_at='server'): it sees "
                + plan_lib.aggregator_sees(centred))
      if m.name == "paper":
        d = m.details
        print(f"  the paper's claim: eps = {d['paper_epsilon_per_iteration']:.6g} per iteration "
              f"(sigma = {d['paper_sigma']:.6g}); the eps above is the honest end-to-end one")
    print(" ".join(f"{m.epsilon:.6g}" for m in plan.mechanisms))
    return 0

  common = dict(sampling_rate=args.sampling_rate, steps=args.steps, delta=args.delta,
                accountant=kind, rdp_orders=args.rdp_orders)
  if args.noise_multiplier is not None:
    eps = accounting.dpsgd_epsilon(args.sampling_rate, args.noise_multiplier, args.steps,
                                   args.delta, kind, args.rdp_orders)
    out = {"epsilon": eps, "noise_multiplier": args.noise_multiplier, **common}
    value = f"{eps:.10g}"
  else:
    sigma = accounting.calibrate_noise(args.sampling_rate, args.steps, args.target_epsilon,
                                       args.delta, kind, field="--target-epsilon",
                                       orders=args.rdp_orders)
    out = {"noise_multiplier": sigma, "target_epsilon": args.target_epsilon, **common}
    value = f"{sigma:.10g}"
  if args.json:
    print(json.dumps(out))
  else:
    print(", ".join(f"{k} = {v}" for k, v in common.items()))
    print(value)
  return 0


if __name__ == "__main__":
  cli.run(main)
