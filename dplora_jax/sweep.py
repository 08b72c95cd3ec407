"""Sweeps: a grid of config overrides, each point a `launch.train` run in its own workdir.

A config file's `sweep()` returns either a dict of axes, `{"fed.aggregation": ["fedavg", "ffa"],
"privacy": [{"dp.mode": "none"}, {"dp.target_epsilon": 8.0}]}` (an axis of dicts sets several
fields at once; the grid is their product), or a list of override dicts (the points themselves).
Overrides apply after the file's `get_config(arg)`, so a field it derives from another (a task's
sequence length, a public client bound split over the clients) would keep the value derived from
the default; an axis keyed `config_arg` (`ARG`) instead takes the file's own `:k=v,...` args,
`{"config_arg": ["task=boolq", "task=piqa"]}`, which get_config sees and derives from.
Points run one after another or N at a time, each as its own process (`python -m launch.train
--config FILE[:ARGS] --workdir DIR/points/NAME --config.k=v ...`), so a killed point resumes
from its checkpoint when the sweep is run again, and a finished one (its summary.json exists) is
skipped.
`collect` then writes results.csv, results.md and the plots into DIR.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Callable

from dplora_jax import config_files, tasks


ARG = "config_arg"  # a sweep key whose values are the config file's own `k=v,...` args


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: its name (a directory name), its dotted-key overrides and, under
  `ARG`, the config file args it adds to the sweep's own."""
  name: str
  overrides: dict

  def workdir(self, root: str) -> str:
    return os.path.join(root, "points", self.name)

  def spec(self, config_spec: str) -> str:
    """The config spec this point runs: `FILE[:ARGS]` with its config args appended (later
    args win in `configs.common.apply_args`)."""
    arg = self.overrides.get(ARG)
    if not arg:
      return config_spec
    path, _, base = config_spec.partition(":")
    return f"{path}:{base},{arg}" if base else f"{path}:{arg}"

  def dotted(self) -> dict[str, str]:
    """The `--config.k=v` overrides, as text."""
    return {k: _text(v) for k, v in self.overrides.items() if k != ARG}


def _short(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _parts(overrides: dict) -> dict[str, str]:
  """The point's name parts (short key -> value); a config arg `task=boolq` gives task: boolq."""
  out = {}
  for k, v in overrides.items():
    if k == ARG:
      if not isinstance(v, str) or not all(i.count("=") == 1 for i in v.split(",")):
        raise ValueError(f"sweep() axis {ARG!r}: expected config file args 'k=v[,k=v]', "
                         f"got {v!r}.")
      out.update(i.split("=") for i in v.split(","))
    else:
      out[_short(k)] = _fmt(v)
  return out


def _name(overrides: dict) -> str:
  if not overrides:
    return "base"
  text = ",".join(f"{k}={v}" for k, v in _parts(overrides).items())
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def _fmt(v) -> str:
  if isinstance(v, (tuple, list)):
    return "+".join(str(x) for x in v)
  if isinstance(v, float) and v.is_integer():
    return str(int(v))
  return str(v)


def expand(spec) -> list[Point]:
  """The points of a `sweep()` result (a dict of axes or a list of override dicts).

  Raises:
    ValueError: an empty sweep, an axis that is not a list, or two points with one name.
  """
  if isinstance(spec, dict):
    axes = []
    for key, values in spec.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"sweep() axis {key!r}: expected a non-empty list of values.")
      axes.append([v if isinstance(v, dict) else {key: v} for v in values])
    combos = [dict(itertools.chain.from_iterable(d.items() for d in c))
              for c in itertools.product(*axes)]
  elif isinstance(spec, (list, tuple)):
    combos = [dict(c) for c in spec]
  else:
    raise ValueError("sweep() must return a dict of axes or a list of override dicts.")
  if not combos:
    raise ValueError("sweep() defines no points.")
  points = [Point(_name(c), c) for c in combos]
  names = [p.name for p in points]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"sweep() gives several points the name {dup[0]!r}; make them differ.")
  return points


def load_points(config_spec: str) -> list[Point]:
  """The points of the config file's `sweep()`, each checked to give a valid RunConfig.

  Raises:
    ValueError: no `sweep()`, or a point whose config is invalid (naming the point).
  """
  path = config_spec.partition(":")[0]
  module = config_files.config_module(config_spec)
  if not hasattr(module, "sweep"):
    raise ValueError(f"config file {path!r} defines no sweep(); add one returning a dict of "
                     "axes (see dplora_jax/sweep.py).")
  points = expand(module.sweep())
  for p in points:
    try:
      config_files.load_with_overrides(p.spec(config_spec), p.dotted())
    except ValueError as e:
      raise ValueError(f"sweep point {p.name}: {e}") from None
  return points


def select(points: list[Point], only: list[str]) -> list[Point]:
  """The points whose name holds every `key=value` of `only` (parts of the name, e.g.
  `task=piqa`); all of them when `only` is empty.

  Raises:
    ValueError: an entry is not key=value, or no point matches.
  """
  for o in only:
    if o.count("=") != 1 or not all(o.split("=")):
      raise ValueError(f"--only {o!r}: expected KEY=VALUE as in the point names (--list).")
  chosen = [p for p in points if set(only) <= set(p.name.split(","))]
  if not chosen:
    raise ValueError(f"--only {' '.join(only)} matches none of the {len(points)} points; their "
                     f"names: {', '.join(p.name for p in points[:4])}{', ...' * (len(points) > 4)}")
  return chosen


def _text(v) -> str:
  if isinstance(v, (tuple, list)):
    return ",".join(str(x) for x in v)
  return str(v)


def finished(point: Point, root: str) -> bool:
  return os.path.isfile(os.path.join(point.workdir(root), "summary.json"))


def command(config_spec: str, point: Point, root: str, prefix_cache_dir: str = "") -> list[str]:
  dotted = point.dotted()
  if prefix_cache_dir and "model.prefix_cache_dir" not in dotted:
    dotted = {"model.prefix_cache_dir": prefix_cache_dir, **dotted}
  return ([sys.executable, "-m", "launch.train", "--config", point.spec(config_spec),
           "--workdir", point.workdir(root), "--quiet"]
          + [f"--config.{k}={v}" for k, v in dotted.items()])


def run(config_spec: str, root: str, points: list[Point], *, parallel: int = 1,
        echo: Callable[[str], None] = print, prefix_cache_dir: str = "") -> dict[str, str]:
  """Runs the unfinished points (`parallel` processes at a time); returns {name: status}
  ("skipped", "done", "resumed", "failed (rc N)"). A point's output goes to its workdir's
  log.txt; a failed point does not stop the others. `prefix_cache_dir`: every point keeps and
  reads the frozen prefix's activations there (`model.prefix_cache_dir`; a point that sets its
  own keeps it), so points on the same rows compute them once (two running at once may both)."""
  os.makedirs(os.path.join(root, "points"), exist_ok=True)
  status, queue, running = {}, [], {}
  total = len(points)
  for i, p in enumerate(points, 1):
    if finished(p, root):
      status[p.name] = "skipped"
      echo(f"[{i}/{total}] {p.name}: finished before, skipped")
    else:
      queue.append((i, p))
  while queue or running:
    while queue and len(running) < max(1, parallel):
      i, p = queue.pop(0)
      wd = p.workdir(root)
      os.makedirs(wd, exist_ok=True)
      resumed = os.path.isdir(os.path.join(wd, "checkpoints"))
      log = open(os.path.join(wd, "log.txt"), "a", encoding="utf-8")
      proc = subprocess.Popen(command(config_spec, p, root, prefix_cache_dir), stdout=log,
                              stderr=subprocess.STDOUT, env=_env())
      running[proc] = (i, p, log, time.time(), resumed)
      echo(f"[{i}/{total}] {p.name}: {'resuming' if resumed else 'started'}")
    time.sleep(0.2)
    for proc in [q for q in running if q.poll() is not None]:
      i, p, log, t0, resumed = running.pop(proc)
      log.close()
      secs = time.time() - t0
      if proc.returncode == 0 and finished(p, root):
        status[p.name] = "resumed" if resumed else "done"
        echo(f"[{i}/{total}] {p.name}: {status[p.name]} in {secs:.0f} s: "
             f"{_headline(p, root)}")
      else:
        status[p.name] = f"failed (rc {proc.returncode})"
        echo(f"[{i}/{total}] {p.name}: FAILED (rc {proc.returncode}); see "
             f"{os.path.join(p.workdir(root), 'log.txt')}")
  return status


def _env() -> dict:
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def _headline(p: Point, root: str) -> str:
  row = result_row(p, root)
  return f"{row['metric']} {row['after']:.3f} (zero-shot {row['before']:.3f}), eps {row['epsilon']}"


def result_row(p: Point, root: str) -> dict:
  """One table row from a finished point's summary.json."""
  with open(os.path.join(p.workdir(root), "summary.json"), encoding="utf-8") as f:
    s = json.load(f)
  task = tasks.get(s.get("task", "tfns"))
  before, after = s["eval"]["before"], s["eval"]["after"]
  metric = task.metric
  eps = s["epsilon"]
  per_round = s["lora_bytes"]
  return {"point": p.name, **_parts(p.overrides),
          "task": task.name, "mode": s["mode"], "aggregation": s["aggregation"],
          "epsilon": round(eps, 3) if math.isfinite(eps) else "inf",
          "delta": s["delta"], "rank": s.get("lora_rank"), "clients": s["clients"],
          "rounds": s["rounds"], "metric": metric, "before": before[metric],
          "after": after[metric], "majority": after.get("majority_accuracy"),
          "lora_bytes_per_client_round": per_round, "bytes_up_total": s["bytes_up_total"],
          "full_model_bytes": s["full_model_bytes"], "wall_seconds": round(s["wall_seconds"], 1)}


def collect(root: str, points: list[Point], title: str = "") -> list[dict]:
  """Writes results.csv, results.md and the plots (PNG) of the finished points into `root`."""
  rows = [result_row(p, root) for p in points if finished(p, root)]
  if not rows:
    return rows
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(root, "results.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
    if title:
      f.write(f"# {title}\n\n")
    f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
    for r in rows:
      f.write("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |\n")
  plots(root, points, rows)
  return rows


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def plots(root: str, points: list[Point], rows: list[dict]):
  """utility_vs_eps.png (per aggregation, with the non-private and zero-shot lines),
  bytes_vs_rank.png and rounds.png (eps and held-out loss per round)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric = rows[0]["metric"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for agg in sorted({r["aggregation"] for r in rows}):
    pts = sorted((float(r["epsilon"]), r["after"]) for r in rows
                 if r["aggregation"] == agg and r["epsilon"] != "inf")
    if pts:
      ax.plot(*zip(*pts), "o-", label=f"DP, {agg}")
    for r in rows:
      if r["aggregation"] == agg and r["epsilon"] == "inf":
        ax.axhline(r["after"], ls="--", lw=1, label=f"non-private, {agg}",
                   color=ax.lines[-1].get_color() if pts else None)
  ax.axhline(rows[0]["before"], ls=":", color="grey", label="zero-shot")
  if rows[0].get("majority") is not None:
    ax.axhline(rows[0]["majority"], ls="-.", color="lightgrey", label="majority class")
  ax.set_xlabel("epsilon (example-level)")
  ax.set_ylabel(metric)
  ax.legend(fontsize=7)
  _save(fig, root, "utility_vs_eps.png")

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for agg in sorted({r["aggregation"] for r in rows}):
    pts = sorted({(int(r["rank"]), r["lora_bytes_per_client_round"]) for r in rows
                  if r["aggregation"] == agg and r["rank"] is not None})
    if pts:
      ax.plot(*zip(*pts), "o-", label=agg)
  ax.set_xlabel("LoRA rank")
  ax.set_ylabel("bytes per client per round (up)")
  ax.legend(fontsize=7)
  _save(fig, root, "bytes_vs_rank.png")

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for p in points:
    recs = _metrics(p, root)
    if not recs:
      continue
    a1.plot([m["round"] for m in recs], [m.get("epsilon", float("nan")) for m in recs],
            label=p.name)
    ev = [(m["round"], m["eval"]["nll"]) for m in recs if "eval" in m]
    if ev:
      a2.plot(*zip(*ev), label=p.name)
  a1.set_xlabel("round")
  a1.set_ylabel("epsilon spent")
  a2.set_xlabel("round")
  a2.set_ylabel("held-out NLL (eval_every)")
  a1.legend(fontsize=6)
  _save(fig, root, "rounds.png")


def _save(fig, root: str, name: str):
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(os.path.join(root, name), dpi=120)
  plt.close(fig)


def _metrics(p: Point, root: str) -> list[dict]:
  path = os.path.join(p.workdir(root), "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]

