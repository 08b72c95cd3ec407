"""launch.sweep: a 2 x 2 grid of the tiny config runs; a killed point resumes from its checkpoint;
the table and plots hold one row per point; rerunning skips finished points."""

import csv
import json
import os
import subprocess
import sys

import pytest

from dplora_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/tiny.py:rounds=2,examples=160"


def _sweep(root, *extra, timeout=300):
  return subprocess.run([sys.executable, "-m", "launch.sweep", "--config", CONFIG,
                         "--workdir", str(root), *extra], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _grid():
  from configs import tiny
  return tiny.sweep()


def test_sweep_runs_resumes_and_skips(tmp_path):
  root = tmp_path / "sweep"
  points = sweep.expand(_grid())
  assert len(points) == 4
  # the first point, started by the sweep's own command, killed after its round-1 checkpoint
  first = points[0]
  cmd = sweep.command(CONFIG, first, str(root))
  wd = first.workdir(str(root))
  os.makedirs(wd)
  env = dict(os.environ, PYTHONPATH=ROOT)
  killer = subprocess.Popen([sys.executable, "-m", "tests.kill_run_cmd", "1", *cmd], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert killer.wait(timeout=180) != 0
  assert os.path.isdir(os.path.join(wd, "checkpoints", "1"))
  assert not os.path.exists(os.path.join(wd, "summary.json"))

  p = _sweep(root, "--parallel", "2")
  assert p.returncode == 0, p.stdout + p.stderr
  assert f"{first.name}: resuming" in p.stdout and f"{first.name}: resumed in" in p.stdout
  with open(os.path.join(wd, "summary.json")) as f:
    assert json.load(f)["resumed_from_round"] == 1
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["point"] for r in rows) == sorted(pt.name for pt in points)
  assert {(r["mode"], r["aggregation"]) for r in rows} == {
      ("none", "fedavg"), ("none", "ffa"), ("sample", "fedavg"), ("sample", "ffa")}
  md = (root / "results.md").read_text().splitlines()
  assert sum(line.startswith("| ") for line in md) == 1 + len(points)  # header + one per point
  for png in ("utility_vs_eps.png", "bytes_vs_rank.png", "rounds.png"):
    assert (root / png).stat().st_size > 1000
  # FFA sends B only: fewer bytes than FedAvg at the same rank
  by = {r["aggregation"]: int(r["lora_bytes_per_client_round"]) for r in rows}
  assert by["ffa"] < by["fedavg"]

  again = _sweep(root)
  assert again.returncode == 0
  assert again.stdout.count("finished before, skipped") == 4


def test_a_bad_sweep_is_one_clear_line(tmp_path):
  cfg = tmp_path / "c.py"
  cfg.write_text("from configs.tiny import get_config\n"
                 "def sweep():\n  return {'dp.epsilon': [1.0, 2.0]}\n")
  p = subprocess.run([sys.executable, "-m", "launch.sweep", "--config", str(cfg), "--workdir",
                      str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=ROOT))
  assert p.returncode == 2
  assert p.stderr.startswith("error: sweep point epsilon=1: unknown config key dp.epsilon "
                             "(closest: dp.target_epsilon")
  with pytest.raises(ValueError, match="axis 'a': expected a non-empty list"):
    sweep.expand({"a": []})


def test_only_selects_points_by_name_part(capsys):
  from launch import sweep as sweep_cli
  assert sweep_cli.main(["--config", "configs/general.py", "--workdir", "unused", "--list",
                         "--only", "task=piqa", "--only", "aggregation=ffa"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [l.split()[0] for l in lines] == ["task=piqa,mode=none,learning_rate=0.2,aggregation=ffa",
                                           "task=piqa,target_epsilon=8,aggregation=ffa"]
  points = sweep.expand(_grid())
  with pytest.raises(ValueError, match="--only task=nope matches none of the 4 points"):
    sweep.select(points, ["task=nope"])
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    sweep.select(points, ["piqa"])
  assert sweep.select(points, []) == points


def test_config_arg_points_run_get_config_with_their_args():
  """Overrides apply after get_config, so a field it derives (configs/general.py: a task's length
  and public client bound) would keep the default task's value (its BoolQ points once ran with
  PIQA's bound and were refused: clients of 573 examples over a bound of 322). A `config_arg`
  axis passes the file's own args instead: each point's config is get_config(those args)."""
  from configs import general
  from dplora_jax import config_files
  spec = "configs/general.py:rounds=2"
  points = sweep.load_points(spec)
  assert {p.overrides[sweep.ARG] for p in points} == {"task=boolq", "task=piqa", "task=winogrande"}
  for p in points:
    task = p.overrides[sweep.ARG].split("=")[1]
    assert p.spec(spec) == f"configs/general.py:rounds=2,task={task}"
    cmd = sweep.command(spec, p, "root")
    assert cmd[cmd.index("--config") + 1] == p.spec(spec)
    assert not any(a.startswith(f"--config.{sweep.ARG}") for a in cmd)
    got = config_files.load_with_overrides(p.spec(spec), p.dotted())
    want = general.get_config(f"rounds=2,task={task}")
    assert (got.data.task, got.data.max_length, got.data.max_client_size, got.fed.rounds) == (
        task, want.data.max_length, want.data.max_client_size, 2), p.name
    assert got.data.max_client_size * got.fed.num_clients >= general.TRAIN_SIZES[task]
  assert {p.name.split(",")[0] for p in points} == {"task=boolq", "task=piqa", "task=winogrande"}
  assert sweep.Point("x", {"a.b": 1}).spec("f.py:k=1") == "f.py:k=1"
  with pytest.raises(ValueError, match="axis 'config_arg': expected config file args"):
    sweep.expand({sweep.ARG: ["task"]})


def test_every_point_is_told_where_the_frozen_prefix_is_kept():
  from dplora_jax import config_files
  points = sweep.expand(_grid())
  for p in points:
    cmd = sweep.command(CONFIG, p, "root", "/data/cache")
    assert "--config.model.prefix_cache_dir=/data/cache" in cmd
    got = config_files.load_with_overrides(p.spec(CONFIG), {"model.prefix_cache_dir":
                                                            "/data/cache", **p.dotted()})
    assert got.model.prefix_cache_dir == "/data/cache"
    assert not any("prefix_cache_dir" in a for a in sweep.command(CONFIG, p, "root"))
  own = sweep.Point("own", {"model.prefix_cache_dir": "/mine"})
  cmd = sweep.command(CONFIG, own, "root", "/data/cache")
  assert [a for a in cmd if "prefix_cache_dir" in a] == ["--config.model.prefix_cache_dir=/mine"]
