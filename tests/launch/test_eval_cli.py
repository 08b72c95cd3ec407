"""launch.eval: a workdir and its exported adapter give the same numbers, which equal the
training loop's "after" numbers; bad input is one clear line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from dplora_jax import config as config_lib, export, train
from launch import eval as eval_cli
from tests import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-round DP run on a real (tiny, random) HF checkpoint, and its exported adapter."""
  tmp = tmp_path_factory.mktemp("eval")
  base = str(tmp / "base")
  hf_fixtures.write_hf(base, "llama", tokenizer=True, vocab_size=320, max_position_embeddings=256)
  c = tiny.get_config("rounds=2,dp_seed=0")
  with c.unlocked():
    c.model.random_init = False
    c.model.path = base
    c.data.max_length = 192  # a byte-level tokenizer: the FinGPT prompt alone is ~130 tokens
  wd = str(tmp / "run")
  summary = train.run(config_lib.from_config_dict(c), wd, progress=False).summary
  adapter = export.export_workdir(wd, str(tmp / "adapter"))
  return dict(base=base, workdir=wd, adapter=adapter, summary=summary, tmp=tmp)


def _eval(args, out):
  assert eval_cli.main(args + ["--out", str(out)]) == 0
  with open(out) as f:
    return json.load(f)


def test_workdir_adapter_and_training_loop_agree(run):
  got = _eval(["--workdir", run["workdir"]], run["tmp"] / "wd.json")
  after = run["summary"]["eval"]["after"]
  assert {k: got[k] for k in after} == after  # the training loop's numbers, exactly
  assert got["task"] == "tfns" and got["n"] == 32 and got["round"] == 2
  ad = _eval(["--model", run["base"], "--adapter", run["adapter"], "--task", "tfns",
              "--examples", "32", "--max-length", "192"], run["tmp"] / "ad.json")
  assert {k: ad[k] for k in after} == after
  # several tasks: one result each, under "results"
  both = _eval(["--workdir", run["workdir"], "--task", "tfns", "--task", "finance_sentiment",
                "--file", "", "--file", ""], run["tmp"] / "both.json")
  assert [r["task"] for r in both["results"]] == ["tfns", "finance_sentiment"]
  assert both["results"][0]["accuracy"] == after["accuracy"]


def test_a_user_file_of_label_words_is_a_finance_sentiment_file(run, tmp_path):
  f = tmp_path / "mine.jsonl"
  f.write_text('{"text": "shares soar on record profit", "label": "positive"}\n'
               '{"text": "the bank cut its outlook", "label": "negative"}\n'
               '{"text": "the meeting is on tuesday", "label": "neutral"}\n')
  got = _eval(["--model", run["base"], "--adapter", run["adapter"], "--task",
               "finance_sentiment", "--file", str(f), "--max-length", "192"], tmp_path / "o.json")
  assert got["n"] == 3 and 0 <= got["accuracy"] <= 1 and "f1_macro" in got
  assert got["majority_accuracy"] == pytest.approx(1 / 3)
  # which label the macro F1 misses: each label's F1 agrees with the confusion matrix written
  assert got["labels"] == ["negative", "positive", "neutral"]
  m = np.array(got["confusion"])
  assert m.sum(1).tolist() == [1, 1, 1]
  assert got["f1_per_label"] == pytest.approx(2 * np.diag(m) / np.maximum(m.sum(0) + m.sum(1), 1))
  assert np.mean(got["f1_per_label"]) == pytest.approx(got["f1_macro"])


@pytest.mark.parametrize("content,match", [
    ('{"txt": "a", "label": "positive"}\n', r"bad.jsonl:1: no field 'text'"),
    ('{"text": "a", "label": "bullish"}\n', r"bad.jsonl:1: label 'bullish'; expected one of"),
    ("\n", r"bad.jsonl: no records \(an empty eval file\)"),
])
def test_bad_eval_files_name_the_file_and_field(run, tmp_path, content, match):
  f = tmp_path / "bad.jsonl"
  f.write_text(content)
  with pytest.raises(ValueError, match=match):
    eval_cli.main(["--workdir", run["workdir"], "--file", str(f)])


def test_commands_answer_bad_input_with_one_line(run):
  cases = [
      (["launch.eval", "--workdir", run["workdir"], "--task", "tfsn"],
       "error: unknown task 'tfsn' (did you mean tfns"),
      (["launch.train", "--config", "configs/tiny.py", "--workdir", str(run["tmp"] / "x"),
        "--config.dp.epsilon=3"],
       "error: unknown config key dp.epsilon (closest: dp.target_epsilon"),
  ]
  for args, want in cases:
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith(want), \
        p.stderr
  # --debug shows the traceback instead
  p = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/tiny.py",
                      "--workdir", str(run["tmp"] / "x"), "--config.dp.epsilon=3", "--debug"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0 and "Traceback" in p.stderr
