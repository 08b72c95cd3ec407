"""Per-institution data files from one dataset: the simulation's partition, written to disk.

A deployment's clients each read their own file; to compare a deployment with the simulation
(or to stage a local demo), `write_client_files` writes client k's part of the simulation's
partition of `data.train_file`, in the simulation's order, as client k's own jsonl file.
"""

from __future__ import annotations

import json
import os

from dplora_jax import build as build_lib, workdir as workdir_lib


def write_client_files(cfg, out_dir: str) -> list[str]:
  """Writes `out_dir/client_<k>.jsonl` for every client k of `cfg`; returns their paths."""
  records, items = build_lib.train_records(cfg)
  parts = build_lib.client_parts(cfg, records, items)
  workdir_lib.make_private_dir(out_dir)
  paths = []
  for k, part in enumerate(parts):
    path = os.path.join(out_dir, f"client_{k}.jsonl")
    with workdir_lib.private_open(path) as f:
      for i in part:
        f.write(json.dumps(records[int(i)]) + "\n")
    paths.append(path)
  return paths
