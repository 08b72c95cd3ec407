"""Guards on by default: a non-finite update stops the run; the noise key's source is reported."""

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from dplora_jax import config as config_lib, train
from dplora_jax.dp import clipping
from dplora_jax.federated import client as client_lib


def test_non_finite_update_stops_the_run(tmp_path, monkeypatch):
  def nan_optimizer(*_):
    return optax.chain(optax.sgd(1.0), optax.scale(float("nan")))

  monkeypatch.setattr(client_lib, "make_client_optimizer", nan_optimizer)
  cfg = config_lib.from_config_dict(tiny.get_config("rounds=2,noise_seed=0"))
  with pytest.raises(FloatingPointError, match="round 1 produced a non-finite update"):
    train.run(cfg, str(tmp_path), progress=False)


def test_non_finite_example_gradients_never_reach_the_sum():
  g = {"w": np.array([[1.0, 2.0], [np.nan, 1.0], [np.inf, 0.0], [3.0, 4.0]], np.float32)}
  valid = np.array([True, True, True, False])
  summed, dropped = clipping.masked_sum(g, valid)
  np.testing.assert_array_equal(np.asarray(summed["w"]), [1.0, 2.0])
  assert int(dropped) == 2
  clipped, _, _, _ = clipping.clip_and_sum(g, valid, 10.0)
  np.testing.assert_allclose(np.asarray(clipped["w"]), [1.0, 2.0])


def test_noise_key_comes_from_os_entropy_unless_seeded():
  k1, src1 = train.make_noise_key(-1)
  k2, _ = train.make_noise_key(-1)
  assert src1 == "os-entropy"
  assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
  s1, src = train.make_noise_key(7)
  s2, _ = train.make_noise_key(7)
  assert src == "seed 7"
  np.testing.assert_array_equal(jax.random.key_data(s1), jax.random.key_data(s2))


def test_report_says_where_the_noise_key_came_from(tmp_path):
  cfg = config_lib.from_config_dict(tiny.get_config("rounds=1"))
  summary = train.run(cfg, str(tmp_path), progress=False)
  assert summary["noise_key_source"] == "os-entropy"
  assert "noise key: os-entropy" in train.format_summary(summary)
