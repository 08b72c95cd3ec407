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
