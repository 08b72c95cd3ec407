"""Guards on by default: a non-finite update stops the run; the noise key's source is reported."""

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from dplora_jax import config as config_lib, train
from dplora_jax.dp import clipping
from dplora_jax.dp.randomness import DPRandomness
from dplora_jax.federated import client as client_lib


def test_non_finite_update_stops_the_run(tmp_path, monkeypatch):
  def nan_optimizer(*_):
    return optax.chain(optax.sgd(1.0), optax.scale(float("nan")))

  monkeypatch.setattr(client_lib, "make_client_optimizer", nan_optimizer)
  cfg = config_lib.from_config_dict(tiny.get_config("rounds=2,dp_seed=0"))
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


def _draws(r: DPRandomness):
  return (np.asarray(jax.random.key_data(r.noise_key)), r.examples(0, 0).random(64),
          r.clients(0).random(64))


def test_every_dp_random_stream_comes_from_os_entropy_unless_seeded():
  a, b = _draws(DPRandomness(-1)), _draws(DPRandomness(-1))
  assert DPRandomness(-1).source == "os-entropy" and DPRandomness(-1).secret
  for x, y in zip(a, b):  # noise key, example sampler, client sampler: all differ
    assert not np.array_equal(x, y)
  s1, s2 = _draws(DPRandomness(7)), _draws(DPRandomness(7))
  for x, y in zip(s1, s2):
    np.testing.assert_array_equal(x, y)
  assert "not secret" in DPRandomness(7).source
  # the three streams are distinct children, not one stream reused
  assert not np.array_equal(s1[1], s1[2])


def test_report_says_where_the_dp_randomness_came_from(tmp_path):
  cfg = config_lib.from_config_dict(tiny.get_config("rounds=1"))
  summary = train.run(cfg, str(tmp_path), progress=False).summary
  assert summary["dp_randomness"] == "os-entropy"
  assert "DP randomness (noise, sampling): os-entropy" in train.format_summary(summary)
