"""Per-example clipping and the Gaussian mechanism: bounds, padding, sensitivity, noise law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dplora_jax.dp import clipping, noise
from dplora_jax.federated import client as client_lib
from tests import tiny


def _grads(b=8, seed=0, scale=3.0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": scale * jax.random.normal(k1, (b, 5, 3)), "b": scale * jax.random.normal(k2, (b, 4))}


def _norm(t):
  return float(clipping.global_norm(t))


def test_every_clipped_norm_at_most_c():
  g = _grads()
  c = 1.5
  for i in range(8):
    one = jax.tree.map(lambda x: x[i:i + 1], g)
    valid = jnp.ones((1,), bool)
    s, sens, norms, _ = clipping.clip_and_sum(one, valid, c)
    assert _norm(s) <= c * (1 + 1e-6)
    assert float(sens) == c
    assert norms[0] > c  # these are all large, so all got clipped to exactly C
    assert _norm(s) == pytest.approx(c, rel=1e-5)


def test_padded_rows_contribute_exactly_zero():
  g = _grads()
  valid = jnp.array([1, 1, 1, 0, 1, 0, 0, 1], bool)
  full, *_ = clipping.clip_and_sum(g, valid, 1.0)
  kept = np.flatnonzero(np.asarray(valid))
  only, *_ = clipping.clip_and_sum(jax.tree.map(lambda x: x[kept], g), jnp.ones(len(kept), bool),
                                   1.0)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(only)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_add_remove_replace_one_example_moves_sum_by_at_most_sensitivity():
  g = _grads(seed=1)
  c = 0.7
  valid = jnp.ones((8,), bool)
  base, sens, *_ = clipping.clip_and_sum(g, valid, c)
  removed, *_ = clipping.clip_and_sum(g, valid.at[3].set(False), c)
  diff = jax.tree.map(jnp.subtract, base, removed)
  assert _norm(diff) <= float(sens) * (1 + 1e-6)
  other = _grads(seed=2, scale=50.0)
  replaced_g = jax.tree.map(lambda x, y: x.at[3].set(y[3]), g, other)
  replaced, *_ = clipping.clip_and_sum(replaced_g, valid, c)
  assert _norm(jax.tree.map(jnp.subtract, base, replaced)) <= 2 * float(sens) * (1 + 1e-6)


def test_non_finite_example_never_reaches_the_sum():
  g = _grads()
  g = jax.tree.map(lambda x: x.at[2].set(jnp.nan), g)
  s, *_ = clipping.clip_and_sum(g, jnp.ones((8,), bool), 1.0)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s))
  assert _norm(s) <= 7.0 + 1e-5


def test_gaussian_noise_std_and_independence():
  zeros = {"a": jnp.zeros((200, 50)), "b": jnp.zeros((3000,))}
  sigma, c = 1.3, 0.5
  out = noise.gaussian_release(jax.random.key(0), zeros, jnp.float32(c), sigma)
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(out)])
  n = x.size
  # chi-square confidence interval for the variance (99.9%)
  lo = (n - 1) * x.var(ddof=1) / stats.chi2.ppf(0.9995, n - 1)
  hi = (n - 1) * x.var(ddof=1) / stats.chi2.ppf(0.0005, n - 1)
  assert lo <= (sigma * c) ** 2 <= hi
  assert abs(x.mean()) < 4 * sigma * c / np.sqrt(n)
  # the two leaves use different subkeys
  a, b = np.ravel(out["a"])[:3000], np.ravel(out["b"])
  assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(3000)


def test_vmap_per_example_grads_equal_python_loop():
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = tiny.examples(5)
  fn = jax.vmap(jax.grad(client_lib.example_loss, argnums=1), in_axes=(None, None, None, 0, 0, 0, 0))
  batched = jax.jit(fn, static_argnums=0)(graphdef, lora, frozen, ex["tokens"], ex["mask"],
                                          ex["targets"], ex["loss_mask"])
  for i in range(5):  # one example at a time (the compiled single-example gradient)
    one = tiny.example_grad(graphdef, lora, frozen, ex["tokens"][i], ex["mask"][i],
                            ex["targets"][i], ex["loss_mask"][i])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_microbatched_clipped_sum_equals_loop_and_noise_law():
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = tiny.examples(8)
  valid = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  c = 0.05
  spec = tiny.client_spec("sample", clip=c, sigma=0.0, divisor=6, microbatch=4)
  g_sum, stats_ = jax.jit(lambda l: client_lib.per_example_grads_sum(
      graphdef, spec, l, frozen, ex, valid))(lora)
  want = jax.tree.map(jnp.zeros_like, lora)
  for i in np.flatnonzero(np.asarray(valid)):
    g = tiny.example_grad(graphdef, lora, frozen, *(ex[k][i] for k in tiny.FIELDS))
    scale = min(1.0, c / _norm(g))
    want = jax.tree.map(lambda w, x: w + scale * x, want, g)
  for a, b in zip(jax.tree.leaves(g_sum), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert int(stats_["count"]) == 6
  # privatized gradient: (sum + N(0, (sigma C)^2)) / B
  sigma = 2.0
  spec = tiny.client_spec("sample", clip=c, sigma=sigma, divisor=6, microbatch=4)
  grad, _ = client_lib.privatized_gradient(graphdef, spec, lora, frozen, ex, valid,
                                           jax.random.key(3))
  z = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b) / 6)
                      for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want))])
  n = z.size
  lo = (n - 1) * z.var(ddof=1) / stats.chi2.ppf(0.9995, n - 1)
  hi = (n - 1) * z.var(ddof=1) / stats.chi2.ppf(0.0005, n - 1)
  assert lo <= (sigma * c / 6) ** 2 <= hi
