"""Partitioning clients and host-side Poisson sampling with fixed shapes."""

import jax
import numpy as np
import pytest

from dplora_jax.dp import sampling
from dplora_jax.dp.randomness import DPRandomness
from dplora_jax.federated.partition import partition


def test_iid_covers_everything_once():
  parts = partition(np.zeros(103), 5, method="iid")
  allidx = np.concatenate(parts)
  assert sorted(allidx.tolist()) == list(range(103))
  assert {len(p) for p in parts} <= {20, 21}


def test_dirichlet_skews_labels_and_covers_everything():
  labels = np.repeat([0, 1, 2], 300)
  parts = partition(labels, 4, method="dirichlet", alpha=0.1, seed=1)
  assert sorted(np.concatenate(parts).tolist()) == list(range(900))
  shares = np.array([[np.mean(labels[p] == c) for c in range(3)] for p in parts])
  assert shares.max() > 0.7  # strongly skewed at alpha = 0.1


def test_field_partition_and_errors():
  vals = ["a", "b", "a", "c", "b", "a"]
  parts = partition(np.zeros(6), 3, method="field", field_values=vals)
  assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [3]]
  with pytest.raises(ValueError, match="3 distinct values"):
    partition(np.zeros(6), 2, method="field", field_values=vals)
  with pytest.raises(ValueError, match="fed.num_clients=10 exceeds the 6 training examples"):
    partition(np.zeros(6), 10)
  with pytest.raises(ValueError, match="client .* is empty"):
    partition(np.repeat([0, 1], 3), 6, method="dirichlet", alpha=0.01, seed=0)


def _rng(seed):
  return np.random.default_rng(seed)


def test_poisson_sampler_shapes_rate_and_padding_slots():
  s = sampling.PoissonSampler([200, 100], [10 / 200, 10 / 100], max_batch=40, rng=_rng(0))
  idx, valid = s.sample(num_steps=300, num_slots=4)
  assert idx.shape == valid.shape == (4, 300, 40)
  assert not valid[2:].any()  # device padding slots
  assert valid[0].sum(1).mean() == pytest.approx(10, rel=0.1)
  assert valid[1].sum(1).mean() == pytest.approx(10, rel=0.1)
  assert (idx[1][valid[1]] < 100).all()
  # indices within a step are distinct
  for st in range(20):
    chosen = idx[0, st][valid[0, st]]
    assert len(set(chosen.tolist())) == len(chosen)


def test_over_full_sample_is_cut_and_counted():
  s = sampling.PoissonSampler([100], [0.5], max_batch=8, rng=_rng(0))
  _, valid = s.sample(num_steps=5, num_slots=1)
  assert (valid.sum(-1) == 8).all() and s.overflows == 5


def test_randomness_round_trip_gives_every_secret_stream_back():
  r = DPRandomness(-1)
  r2 = DPRandomness.from_state(r.state())
  a = sampling.PoissonSampler([50], [0.1], 16)
  for k, rnd in ((0, 0), (0, 3), (2, 1)):
    np.testing.assert_array_equal(a.sample_client(0, 3, r.examples(k, rnd))[0],
                                  a.sample_client(0, 3, r2.examples(k, rnd))[0])
  np.testing.assert_array_equal(r.clients(4).random(5), r2.clients(4).random(5))
  np.testing.assert_array_equal(jax.random.key_data(r.noise_key),
                                jax.random.key_data(r2.noise_key))
  np.testing.assert_array_equal(jax.random.key_data(r.centre_key),
                                jax.random.key_data(r2.centre_key))
  # the centre's noise key is secret (another root, another key) and not the steps' noise key
  other = DPRandomness(-1)
  assert not np.array_equal(jax.random.key_data(r.centre_key),
                            jax.random.key_data(other.centre_key))
  assert not np.array_equal(jax.random.key_data(r.centre_key), jax.random.key_data(r.noise_key))


def test_every_client_and_round_draws_its_own_stream():
  """No two (client, round) sampling streams, nor the client sampler, share draws."""
  r = DPRandomness(-1)
  draws = [r.examples(k, rnd).random(8) for k in range(3) for rnd in range(3)]
  draws += [r.clients(rnd).random(8) for rnd in range(3)]
  flat = np.concatenate(draws)
  assert len(np.unique(flat)) == len(flat)


def test_choose_max_batch_meets_budget():
  b = sampling.choose_max_batch(1000, 0.016, 100, 8.0, 1e-7, 8)
  assert b % 8 == 0
  assert sampling.truncation_delta(1000, 0.016, b, 100, 8.0) <= 1e-7
  assert sampling.truncation_delta(1000, 0.016, b - 8, 100, 8.0) > 1e-7
