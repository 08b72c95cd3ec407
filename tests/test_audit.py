"""One-run privacy audit: the bound's arithmetic, and the audit on SmolLM2 with and without DP."""

import json
import math
import os

import numpy as np
import pytest

from configs import audit as audit_config
from dplora_jax import audit, config as config_lib
from launch import audit as audit_cli


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_delta():
  # 10 of 10 correct under eps = 0: P(Bin(10, 1/2) >= 10) = 2^-10
  assert audit.p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(2 ** -10)
  assert audit.p_value(100, 10, 10, 0.0, 1e-3) > 2 ** -10
  assert audit.p_value(100, 10, 5, 1.0, 0.0) > audit.p_value(100, 10, 5, 0.0, 0.0)


def test_lower_bound_matches_a_hand_computed_all_correct_case():
  # v = r: p(eps) = q^r with q = e^eps / (1 + e^eps); the bound solves q^r = 0.05
  r = 50
  q = 0.05 ** (1 / r)
  want = math.log(q / (1 - q))
  assert audit.epsilon_lower_bound(200, r, r, 0.0, 0.95) == pytest.approx(want, abs=1e-5)
  # chance-level guessing gives no evidence
  assert audit.epsilon_lower_bound(200, 50, 25, 1e-5) == 0.0
  # the delta term can only lower the bound
  assert audit.epsilon_lower_bound(200, r, r, 1e-4) <= want


def test_guesses_take_the_extremes():
  g = audit.guess(np.array([0.1, 5.0, -3.0, 0.2, 4.0, -1.0]), 2, 2)
  np.testing.assert_array_equal(g, [0, 1, -1, 0, 1, -1])
  res = audit.audit(np.array([3.0, 2.0, -1.0, -2.0]), np.array([True, True, False, False]),
                    k_pos=2, k_neg=2, delta=0.0)
  assert (res["guesses"], res["correct"]) == (4, 4)


def test_canaries_have_unique_one_token_answers():
  from dplora_jax.models import load_tokenizer
  tok = load_tokenizer("smollm2-135m-instruct")
  c = audit.make_canaries(tok, 40, prompt="Input: {text}\nAnswer:", max_length=40, seed=1)
  assert len(set(c.words)) == 40
  assert c.examples.loss_mask.sum(axis=1).tolist() == [1] * 40
  parts = c.per_client(3)
  assert sum(len(p) for p in parts) == c.included.sum()


_AUDITS = {}  # kept across fixture rebuilds: pytest-xdist may interleave another file's tests


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
  if _AUDITS:
    return _AUDITS
  out = {}
  # fixed sampling seeds: with OS entropy the no-DP bound varied between runs (1.39 in one, 0.77
  # in another make test), so the test measured luck; seed 0 gives 1.25
  for name, arg in (("none", "mode=none,dp_seed=0"),
                    ("dp", "mode=sample,eps=1,rounds=1,steps=1,dp_seed=0")):
    wd = str(tmp_path_factory.mktemp(name))
    assert audit_cli.main(["--config", f"configs/audit.py:{arg}", "--workdir", wd,
                           "--canaries", "100", "--quiet"]) == 0
    out[name] = json.load(open(os.path.join(wd, "audit.json")))
  _AUDITS.update(out)
  return _AUDITS


def test_audit_detects_leakage_without_dp(audits):
  a = audits["none"]
  assert set(a) >= {"epsilon_lower_bound", "epsilon_claimed", "canaries", "confidence"}
  assert a["canaries"] == 100 and a["confidence"] == 0.95
  assert a["epsilon_claimed"] == math.inf
  assert a["epsilon_lower_bound"] > 1.0  # clearly above 0: the canaries leak
  assert a["mean_score_included"] > a["mean_score_excluded"]


def test_audit_with_dp_stays_below_the_claimed_epsilon(audits):
  a = audits["dp"]
  assert a["epsilon_claimed"] <= 1.0 + 1e-9
  assert a["epsilon_lower_bound"] <= a["epsilon_claimed"]


def test_audit_compares_with_the_claim_that_covers_one_example(tmp_path):
  """A canary is one example: the client-level (whole client, add/remove) eps does not cover it,
  so dp.mode='client' is refused before any training; sample+client uses the example claim."""
  cfg = config_lib.from_config_dict(audit_config.get_config("mode=client"))
  with pytest.raises(ValueError, match="no claim of this run covers it"):
    audit.run_audit(cfg, str(tmp_path), canaries=10)
  assert not os.listdir(tmp_path)
  for mode, claim in (("sample", "example"), ("sample+client", "example"), ("paper", "paper"),
                      ("none", None)):
    c = audit_config.get_config(f"mode={mode}")
    if mode == "paper":
      with c.unlocked():
        c.data.sampling, c.fed.local_steps = "shuffle", 1
        c.optim.optimizer = "sgd"
    assert audit.covering_claim(config_lib.from_config_dict(c)) == claim


def test_audit_answers_a_held_workdir_with_one_line(tmp_path):
  """The audit trains, so a workdir that training refuses (here: held by a live run) is bad
  input answered like launch.train's: one `error:` line, exit status 2 (the command as run)."""
  import socket
  import subprocess
  import sys
  from dplora_jax import workdir
  holder = subprocess.Popen(["sleep", "120"])
  try:
    json.dump({"pid": holder.pid, "host": socket.gethostname()},
              open(tmp_path / workdir.LOCK, "w"))
    p = subprocess.run([sys.executable, "-m", "launch.audit", "--config",
                        "configs/audit.py:mode=none", "--workdir", str(tmp_path),
                        "--canaries", "10", "--quiet"], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  finally:
    holder.kill()
    holder.wait(timeout=10)
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.startswith("error: ") and "held by another run" in p.stderr, p.stderr[-2000:]
  assert p.stderr.count("\n") == 1
