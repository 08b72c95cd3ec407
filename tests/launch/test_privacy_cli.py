"""launch.privacy: published vectors, calibration round trip, config plans, bad flags."""

import json
import math

import pytest

from launch import privacy


def _last(capsys):
  return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,want", [
    # TF Privacy compute_dp_sgd_privacy_test (q = batch / n, steps = ceil(epochs n / batch))
    (["--noise-multiplier", "1.3", "--sampling-rate", str(150 / 60000), "--steps",
      str(math.ceil(15 * 60000 / 150)), "--delta", "1e-5", "--rdp-orders", "tf_privacy"],
     0.7242234026109595),
    (["--noise-multiplier", "1.0", "--sampling-rate", str(100 / 100000), "--steps",
      str(math.ceil(30 * 100000 / 100)), "--delta", "1e-7", "--rdp-orders", "tf_privacy"],
     1.4154988495444845),
    # Opacus accountants_test inputs with dp-accounting's conservative conversion
    (["--noise-multiplier", "1.5", "--sampling-rate", "0.04", "--steps", "2250", "--delta",
      "1e-5", "--rdp-orders", "opacus"], 7.329334702),
])
def test_reproduces_published_vectors(capsys, argv, want):
  assert privacy.main(argv) == 0
  assert float(_last(capsys)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_round_trips_within_one_percent(capsys, accountant):
  common = ["--sampling-rate", "0.04", "--steps", "2000", "--delta", "1e-5", "--accountant",
            accountant]
  privacy.main(["--target-epsilon", "8"] + common)
  sigma = float(_last(capsys))
  if accountant == "rdp":
    assert sigma == pytest.approx(1.3562, abs=2e-3)  # Opacus' calibration vector
  privacy.main(["--noise-multiplier", repr(sigma)] + common)
  assert float(_last(capsys)) == pytest.approx(8.0, rel=0.01)


def test_json_output(capsys):
  privacy.main(["--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--steps", "100",
                "--delta", "1e-5", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert set(out) >= {"epsilon", "noise_multiplier", "sampling_rate", "steps", "delta"}


def test_config_plan_lists_every_mechanism(capsys):
  privacy.main(["--config", "configs/tiny.py:mode=sample+client,weighting=uniform"])
  out = capsys.readouterr().out.strip().splitlines()
  assert any(l.startswith("[example] unit: one example") for l in out)
  assert any(l.startswith("[client] unit: one whole client") for l in out)
  eps = [float(x) for x in out[-1].split()]
  assert len(eps) == 2 and all(0.99 * 8 <= e <= 8 for e in eps)
  privacy.main(["--config", "configs/tiny.py:mode=sample", "--json"])
  plan = json.loads(capsys.readouterr().out)
  [m] = plan["mechanisms"]
  assert (m["name"], m["sampling_rate"], m["releases_per_round"], m["rounds"]) == (
      "example", 0.08, 2, 5)


@pytest.mark.parametrize("argv,match", [
    (["--noise-multiplier", "1", "--target-epsilon", "2", "--sampling-rate", "0.1", "--steps",
      "10", "--delta", "1e-5"], "exactly one of --noise-multiplier"),
    (["--sampling-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "exactly one of"),
    (["--noise-multiplier", "1"], "missing --sampling-rate, --steps, --delta"),
    (["--noise-multiplier", "1", "--sampling-rate", "1.5", "--steps", "10", "--delta", "1e-5"],
     r"--sampling-rate=1.5 must be in \(0, 1\]"),
    (["--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "0", "--delta", "1e-5"],
     "--steps=0 must be >= 1"),
    (["--noise-multiplier", "-1", "--sampling-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
     "--noise-multiplier=-1.0 must be > 0"),
    (["--config", "configs/tiny.py", "--noise-multiplier", "1"], "contradicts"),
])
def test_contradictory_or_missing_flags_are_clear_errors(capsys, argv, match):
  with pytest.raises(SystemExit) as e:
    privacy.main(argv)
  assert e.value.code == 2
  import re
  assert re.search(match, capsys.readouterr().err)


def test_unreachable_target_names_the_flag():
  with pytest.raises(ValueError, match="--target-epsilon=1e-06 is unreachable"):
    privacy.main(["--target-epsilon", "1e-6", "--sampling-rate", "0.5", "--steps", "1000",
                  "--delta", "1e-5"])
