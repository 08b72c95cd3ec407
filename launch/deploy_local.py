"""A whole cross-silo deployment on this machine (`make deploy-demo`): one SuperLink (the
coordinator), one SuperNode per institution, each with its own slice of the data on disk, its own
state directory and budget, TLS with test certificates and SuperNode authentication; then the
Flower app runs to the end and every process is stopped.

  python -m launch.deploy_local --config configs/deploy.py --workdir runs/deploy_demo
  python -m launch.deploy_local --config configs/tiny.py:clients=3,rounds=2 --workdir /tmp/d

Each institution's data is its part of the simulation's partition of data.train_file
(WORKDIR/institution_K/data.jsonl), so the same config run with launch.train is the simulation of
this deployment. Bad input is one `error:` line and exit 2 (--debug: the traceback).
"""

import argparse
import json
import os
import re
import sys
import time

from launch import cli

NOISE = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG|WARNING)|^(INFO|DEBUG):flwr|^\s*$")


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m launch.deploy_local", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.OVERRIDE_HELP)
  p.add_argument("--config", required=True, help="config file[:args], e.g. configs/deploy.py")
  p.add_argument("--workdir", required=True, help="root of the coordinator's and institutions' "
                                                  "directories")
  p.add_argument("--max-epsilon", type=float, default=0.0,
                 help="each institution's own example-level budget (default: the config's "
                      "dp.target_epsilon)")
  p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
  p.add_argument("--round-timeout", type=float, default=900.0)
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  rest, overrides = cli.split_overrides(argv)
  return p.parse_args(rest), overrides


def main(argv=None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  cfg = cli.load_config(args.config, overrides)  # validated here: errors before any process
  from dplora_jax.deploy import data as data_lib, local
  from dplora_jax.deploy.protocol import check_deployable
  check_deployable(cfg)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  k = cfg.fed.num_clients
  budget = args.max_epsilon or cfg.dp.target_epsilon
  staged = data_lib.write_client_files(cfg, os.path.join(root, "staging"))
  homes = []
  for i, path in enumerate(staged):
    home = os.path.join(root, f"institution_{i}")
    os.makedirs(home, exist_ok=True)
    os.replace(path, os.path.join(home, "data.jsonl"))
    homes.append(home)
  os.rmdir(os.path.join(root, "staging"))
  tls = None if args.insecure else local.make_certificates(os.path.join(root, "certs"))
  spec, _, cfg_args = args.config.partition(":")
  run_config = {"config": os.path.abspath(spec) + (":" + cfg_args if cfg_args else ""),
                "overrides": " ".join(f"{key}={v}" for key, v in overrides.items()),
                "workdir": os.path.join(root, "coordinator"),
                "round-timeout": float(args.round_timeout), "wait-for-clients": 300.0}

  def show(line):
    if not NOISE.search(line):
      print(line, flush=True)

  t0 = time.time()
  with local.LocalFederation(os.path.join(root, "flower"), tls=tls, auth=not args.insecure,
                             log=show) as fed:
    fed.start_superlink()
    print(f"SuperLink (coordinator): 127.0.0.1:{fed.port}, pid {fed.superlink.pid}, "
          f"{'TLS + SuperNode authentication' if tls else 'INSECURE (no TLS, no auth)'}; "
          f"log {fed.root}/superlink.log")
    for i, home in enumerate(homes):
      key = None
      if not args.insecure:
        key = local.make_node_key(os.path.join(home, "node_key"))
        fed.register(key + ".pub")
      node = {"partition-id": i, "data-path": os.path.join(home, "data.jsonl"),
              "state-dir": os.path.join(home, "state"), "max-epsilon": budget}
      if cfg.dp.reproducible_seed >= 0:
        node["allow-reproducible-seed"] = True
      fed.start_node(i, node, private_key=key)
      with open(node["data-path"]) as f:
        n = sum(1 for _ in f)
      print(f"SuperNode {i} (institution {i}): pid {fed.nodes[i].pid}, its data "
            f"{node['data-path']} ({n} examples, never leaves it), state {node['state-dir']}, "
            f"max-epsilon {budget}; log {fed.root}/supernode_{i}.log")
    print(f"ServerApp: run by the SuperLink; workdir {run_config['workdir']}")
    rc, _ = fed.run(run_config, timeout=args.timeout)
  if rc != 0:
    print(f"error: the Flower run failed (exit {rc}); see {fed.root}/*.log", file=sys.stderr)
    return 1
  summary_path = os.path.join(run_config["workdir"], "summary.json")
  with open(summary_path) as f:
    summary = json.load(f)
  print(f"deployment finished in {time.time() - t0:.0f} s: {summary['deployment']['rounds_done']} "
        f"rounds, eps {summary['epsilon']:.3f} (example-level), adapter {summary.get('adapter')}; "
        f"{k} institutions' ledgers in {root}/institution_*/state")
  return 0


if __name__ == "__main__":
  cli.run(main)
