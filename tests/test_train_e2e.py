"""End to end on the tiny config: loss falls, LoRA moves, the summary is consistent."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from dplora_jax import build, config as config_lib, lora as lora_lib, train


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tiny"))
  # private diagnostics on: this test reads the (non-private) training loss
  c = tiny.get_config("rounds=6,dp_seed=0,diagnostics=1,buckets=3")
  with c.unlocked():
    c.eval_every = 3  # the released LoRA on the public held-out set, rounds 3 and 6
  cfg = config_lib.from_config_dict(c)
  res = train.run(cfg, wd, progress=False)
  return wd, cfg, res.summary, res


def _factors(tree, name):
  return [np.asarray(x) for x, f in zip(jax.tree.leaves(tree),
                                        jax.tree.leaves(lora_lib.factor_of(tree))) if f == name]


def test_loss_falls_and_lora_moves(result):
  wd, cfg, summary, res = result
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [l["round"] for l in lines] == list(range(1, 7))
  losses = [l["private_loss"] for l in lines]
  assert np.mean(losses[-2:]) < losses[0] - 0.05
  b0, b1 = _factors(res.setup.lora, "b"), _factors(res.lora, "b")
  assert b0 and all(np.all(x == 0) for x in b0)  # B started at zero (PEFT init)
  assert all(np.abs(x).max() > 0 for x in b1)  # and every B moved
  a0, a1 = _factors(res.setup.lora, "a"), _factors(res.lora, "a")
  assert all(not np.array_equal(x, y) for x, y in zip(a0, a1))  # A trains too (fedavg)
  assert summary["private_diagnostics"] and "NON-PRIVATE" in summary["diagnostics"]["warning"]
  assert summary["compile_seconds"] > 0  # the bucketed round was compiled before round 1


def test_summary_consistent(result):
  wd, cfg, summary, _ = result
  on_disk = json.load(open(os.path.join(wd, "summary.json")))
  for key in ("mode", "epsilon", "delta", "noise_multiplier", "accountant", "rounds", "clients",
              "clients_per_round", "local_steps", "lora_params", "bytes_up_total",
              "bytes_down_total", "full_model_bytes", "eval"):
    assert key in on_disk
  assert on_disk["epsilon"] <= cfg.dp.target_epsilon
  assert on_disk["epsilon"] >= 0.99 * cfg.dp.target_epsilon
  assert on_disk["delta"] <= cfg.dp.delta
  assert on_disk["bytes_up_total"] == on_disk["lora_bytes"] * cfg.fed.num_clients * cfg.fed.rounds
  assert on_disk["lora_bytes"] == 4 * on_disk["lora_params"]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  eps = [l["epsilon"] for l in lines]
  assert eps == sorted(eps) and eps[-1] == pytest.approx(on_disk["epsilon"])
  for part in ("before", "after"):
    assert set(on_disk["eval"][part]) >= {"accuracy", "f1_macro", "majority_accuracy", "nll"}
  # eval_every: held-out metrics in metrics.jsonl at rounds 3 and 6; round 6's are the "after"
  assert [l["round"] for l in lines if "eval" in l] == [3, 6]
  assert lines[-1]["eval"] == on_disk["eval"]["after"]
  after = on_disk["eval"]["after"]  # which class the macro F1 misses: per label, and the matrix
  assert sum(map(sum, after["confusion"])) == after["n"]
  assert len(after["f1_per_label"]) == len(after["labels"]) == len(after["confusion"])
  assert f"fine-tuned {after['labels'][0]} {after['f1_per_label'][0]:.3f}, " in \
      train.format_summary(on_disk)


def test_lr_zero_is_refused(tmp_path):
  c = tiny.get_config("rounds=2")
  with c.unlocked():
    c.optim.learning_rate = 0.0
  with pytest.raises(RuntimeError, match="did not move"):
    train.run(config_lib.from_config_dict(c), str(tmp_path), progress=False)


def test_bad_data_errors_before_compiling(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine", "label": 1}\n{"text": "  ", "label": 0}\n')
  c = tiny.get_config()
  with c.unlocked():
    c.data.train_file = str(bad)
    c.fed.num_clients = 1
    c.data.batch_size = 1
    c.dp.delta = 0.1
    c.dp.allow_large_delta = True
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field .text. must be a non-empty string"):
    build.build(config_lib.from_config_dict(c))
  with c.unlocked():
    c.data.train_file = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    build.build(config_lib.from_config_dict(c))
