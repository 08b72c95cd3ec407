"""The private mean (dp.statistics): sensitivity 1 by construction, noise of the stated scale."""

import dp_accounting
import jax
import numpy as np
import pytest

from dplora_jax.dp import statistics


def test_unit_rows_bound_one_rows_contribution_whatever_its_scale():
  x = np.random.default_rng(0).normal(size=(6, 5)) * np.array([[1e-3], [1], [10], [1e4], [3], [0.2]])
  u = np.asarray(statistics.unit_rows(x))
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-6)
  # the sum with and without any one row differs by exactly that row: norm 1 (add/remove)
  for i in range(len(x)):
    rest = np.asarray(statistics.unit_rows(np.delete(x, i, 0))).sum(0)
    assert np.linalg.norm(u.sum(0) - rest) == pytest.approx(1.0, rel=1e-5)


def test_private_mean_adds_gaussian_noise_of_sigma_to_the_sum_of_unit_rows():
  rng = np.random.default_rng(1)
  n, d, sigma = 50, 4000, 3.0
  x = rng.normal(size=(n, d)) + 5.0
  exact = np.asarray(statistics.unit_rows(x)).sum(0)
  release = np.asarray(statistics.private_mean(jax.random.key(2), x, sigma))
  z = release * n - exact  # the noise on the sum, one draw per coordinate
  assert abs(z.mean()) < 4 * sigma / np.sqrt(d)
  assert z.std() == pytest.approx(sigma, rel=0.05)
  # rescaling a row does not change the release (the row is normed first)
  x2 = x.copy()
  x2[0] *= 1e3
  np.testing.assert_allclose(statistics.private_mean(jax.random.key(2), x2, sigma), release,
                             rtol=1e-5, atol=1e-6)
  # fresh keys give fresh noise
  other = np.asarray(statistics.private_mean(jax.random.key(3), x, sigma))
  assert np.corrcoef(release * n - exact, other * n - exact)[0, 1] < 0.1
  assert statistics.mean_event(sigma) == dp_accounting.GaussianDpEvent(sigma)
  with pytest.raises(ValueError, match="sigma > 0"):
    statistics.private_mean(jax.random.key(0), x, 0.0)


def test_a_released_mean_moves_by_at_most_one_per_example_and_pads_are_zero():
  """`mean_sums`: (sums, count) of any example set, with or without any one example, differ by
  <= 1 in L2 (the Gaussian's sensitivity), whatever the rows' scale; padded rows add exactly 0."""
  rng = np.random.default_rng(3)
  blocks = {"a": rng.normal(size=(7, 5)) * np.array([[1e-3], [1], [10], [1e4], [3], [0.2], [50]]),
            "b": rng.normal(size=(7, 3)) + 2.0}
  bounds = {"a": np.full(5, 2.0), "b": 1.5}
  sums, count = statistics.mean_sums(blocks, bounds)
  for i in range(7):
    rest, rc = statistics.mean_sums({k: np.delete(v, i, 0) for k, v in blocks.items()}, bounds)
    diff = np.concatenate([np.asarray(sums[k] - rest[k]) for k in sums] + [[float(count - rc)]])
    assert np.linalg.norm(diff) <= 1.0 + 1e-6
  # a row within its bounds is not clipped: its mean comes back exactly
  small = {"a": np.full((4, 5), 0.3), "b": np.full((4, 3), -0.2)}
  s, c = statistics.mean_sums(small, bounds)
  mean = statistics.mean_from_sums(s, c, bounds)
  np.testing.assert_allclose(mean["a"], 0.3, rtol=1e-6)
  np.testing.assert_allclose(mean["b"], -0.2, rtol=1e-6)
  valid = np.array([True, True, False, False])
  padded = {k: np.where(valid[:, None], v, 1e6) for k, v in small.items()}
  s2, c2 = statistics.mean_sums(padded, bounds, valid)
  np.testing.assert_allclose(statistics.mean_from_sums(s2, c2, bounds)["a"], 0.3, rtol=1e-6)
  assert float(c2) == pytest.approx(2 * statistics.COUNT)


def test_the_released_mean_sums_get_noise_of_sigma_per_coordinate_fresh_per_key():
  sums = {"x": np.zeros(3000, np.float32), "y": np.zeros(1000, np.float32)}
  (s1, c1), (s2, _) = (statistics.release_mean_sums(jax.random.key(k), sums, 0.0, 2.5)
                       for k in (0, 1))
  z = np.concatenate([np.asarray(s1["x"]), np.asarray(s1["y"])])
  assert z.std() == pytest.approx(2.5, rel=0.05) and abs(z.mean()) < 4 * 2.5 / np.sqrt(4000)
  assert np.corrcoef(np.asarray(s1["x"]), np.asarray(s2["x"]))[0, 1] < 0.1  # a fresh draw
  assert float(c1) != 0.0  # the count is noised too
  exact, count = statistics.release_mean_sums(jax.random.key(0), sums, 4.0, 0.0)
  assert float(count) == 4.0 and not np.asarray(exact["x"]).any()
