"""The step profiler's bookkeeping (benchmarks/profile_step.py): self times, HLO lookup, FLOPs."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_step


def test_self_time_subtracts_nested_events_per_thread():
  ev = [{"ph": "X", "name": "outer", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 1, "dur": 3, "pid": 1, "tid": 1},
        {"ph": "X", "name": "b", "ts": 5, "dur": 4, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 2, "dur": 7, "pid": 1, "tid": 2}]  # another thread
  times, calls = profile_step.self_times(ev)
  assert times == {"outer": 3, "a": 10, "b": 4} and calls == {"outer": 1, "a": 2, "b": 1}


def test_a_traced_matmul_is_found_in_the_hlo_with_its_flops():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(axis=0))
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  compiled = f.lower(a, b).compile()
  hlo = profile_step.parse_hlo(compiled.as_text())
  times, calls, wall = profile_step.profile(compiled, (a, b))
  traced = {n: hlo[n] for n in times if n in hlo}
  matmuls = [n for n, i in traced.items() if profile_step.category(i) == "matmul"]
  assert matmuls and wall > 0
  assert sum(profile_step.dot_flops(hlo[n], hlo) for n in matmuls) == 2 * 64 * 32 * 48


def test_the_accelerator_step_is_bfloat16_with_float32_lora():
  """benchmarks.accelerator's rows: a random-init Llama of a named shape, base stored and
  multiplied in bfloat16, and the DP step returns float32, finite, moved LoRA factors."""
  import argparse

  import numpy as np

  from benchmarks import jax_step
  p = argparse.ArgumentParser()
  jax_step.add_step_args(p)
  args = p.parse_args(["--model", "random:tiny", "--dp", "--batch", "2", "--seq", "16",
                       "--microbatch", "2", "--dtype", "bfloat16", "--param-dtype", "bfloat16",
                       "--attention", "dot_product"])
  fn, (lora, frozen, batch, key), loaded = jax_step.build_step(args)
  assert loaded.config.dtype == "bfloat16" and loaded.config.hidden_size == 64
  kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(frozen)
             if getattr(path[-2], "key", None) in ("kernel", "embedding")]
  assert kernels and {x.dtype for x in kernels} == {jnp.bfloat16.dtype}
  out = fn(lora, frozen, batch, key)
  leaves, before = jax.tree.leaves(out), jax.tree.leaves(lora)
  assert {x.dtype for x in leaves} == {jnp.float32.dtype}
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, before))


def test_useful_flops_by_hand_and_with_only_the_top_layers_trained():
  from benchmarks import flops
  from dplora_jax.models import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=4, num_layers=3, num_heads=2,
                    num_kv_heads=1, head_dim=2, intermediate_size=8)
  b, t, r = 2, 5, 1
  # per layer and token: q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8, down 8x4 = 144 MACs;
  # attention 2 products of t x t x (heads x head_dim); LoRA r(4+4) + r(4+2) + r(4+2) = 20 MACs
  layer = 2 * b * t * 144 + 4 * b * t * t * 4
  lora = 2 * b * t * 20
  head = 2 * b * 1 * 4 * 10
  assert flops.step_flops(cfg, b, t, 1, r) == 3 * (2 * layer + 3 * lora) + 2 * head
  # top layer only: the forward still runs all 3 layers, the backward one
  assert flops.step_flops(cfg, b, t, 1, r, first_layer=2) == (
      3 * (layer + lora) + head + (layer + 2 * lora) + head)
  assert flops.step_flops(cfg, b, t, 1, r, first_layer=2, cached_prefix=True) == (
      (layer + lora) + head + (layer + 2 * lora) + head)


def test_the_feature_probe_reads_the_prompt_only_and_fits_a_separable_set():
  """benchmarks.feature_probe: both features come from the positions up to the one predicting
  the answer (the answer token changes neither: a mean over it would leak the label), the prompt
  mean is that of the frozen prefix's rows there, and the probe fits a separable 3-class set."""
  from types import SimpleNamespace

  import numpy as np

  from benchmarks import feature_probe
  from dplora_jax import lora as lora_lib
  from dplora_jax.data.classification import Examples
  from tests import tiny
  graphdef, lora, frozen = tiny.model_and_lora(first_layer=1)
  s = SimpleNamespace(graphdef=graphdef, lora=lora, frozen=frozen)
  rng = np.random.default_rng(0)
  n, t, p = 3, tiny.T, 7
  tokens = rng.integers(0, tiny.ARCH.vocab_size, (n, t)).astype(np.int32)
  mask = np.arange(t)[None].repeat(n, 0) < p + 2
  zeros = np.zeros((n, t), np.int32)
  ex = lambda tok: Examples(tok, mask, zeros, zeros.astype(bool), np.arange(n, dtype=np.int32),
                            np.full(n, p, np.int32))
  other_answer, other_prompt = tokens.copy(), tokens.copy()
  other_answer[:, p] = (tokens[:, p] + 1) % tiny.ARCH.vocab_size
  other_prompt[:, 2] = (tokens[:, 2] + 1) % tiny.ARCH.vocab_size
  last, mean = feature_probe.features(s, ex(tokens), chunk=4)
  for a, b in zip((last, mean), feature_probe.features(s, ex(other_answer), chunk=4)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(mean, feature_probe.features(s, ex(other_prompt), chunk=4)[1])
  h = np.asarray(lora_lib.frozen_prefix(graphdef, lora, frozen, tokens, mask))
  np.testing.assert_allclose(last, h[:, p - 1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, h[:, :p].mean(1), rtol=1e-5, atol=1e-5)
  # the q / k / v input's mean share: layer 1's attention RMSNorm of the prefix, by hand
  model = lora_lib.merge(graphdef, lora, frozen)
  x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + tiny.ARCH.norm_eps)
  x = x * np.asarray(model.layers.attn_norm.scale[...])[1]
  unit = lambda r: r / np.linalg.norm(r, axis=-1, keepdims=True)
  share = lambda r: float((unit(r).mean(0) ** 2).sum())
  per_example = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  got = feature_probe.attention_input_share(s, ex(tokens), 1)
  np.testing.assert_allclose(got, (share(x[mask]), share(per_example)), rtol=1e-4)
  assert 0 < got[0] < got[1] <= 1

  centers = 4.0 * np.eye(3, 5)
  y = rng.integers(0, 3, 90)
  x = (centers[y] + rng.normal(size=(90, 5))).astype(np.float32)
  pred = feature_probe.probe(x[:60], y[:60], x[60:], 3, l2=0.01)
  assert (pred == y[60:]).mean() == 1.0


def test_the_dp_probe_accounts_the_mean_and_every_step_and_centring_frees_the_clip():
  """benchmarks.feature_probe.dp_probe: sigma is the smallest with the PLD eps of (private mean)
  + (Poisson-sampled Gaussian)^steps at the target, computed here with dp-accounting directly;
  on rows that share a large common part (as a model's hidden states do) the uncentred read-out
  spends the clip on that part, the privately centred one fits."""
  import dp_accounting
  import jax
  import numpy as np
  from dp_accounting.pld import pld_privacy_accountant

  from benchmarks import feature_probe
  rng = np.random.default_rng(0)
  n, d, steps = 3000, 200, 50
  y = rng.integers(0, 3, n + 300)
  x = 0.2 * (np.eye(3, d)[y] + 0.3 * rng.normal(size=(n + 300, d))) + 5.0 * np.eye(d)[5]
  assert feature_probe.mean_share(x[:n]) > 0.95
  kw = dict(rate=0.1, steps=steps, clip=1.0, lr=2.0, momentum=0.9, centre_sigma=4.0)
  acc = {}
  for centre in feature_probe.CENTRES:
    pred, sigma = feature_probe.dp_probe(jax.random.key(1), x[:n], y[:n], x[n:], 3, epsilon=2.0,
                                         centre=centre, **kw)
    acc[centre] = (pred == y[n:]).mean()

    def eps(s):
      a = pld_privacy_accountant.PLDAccountant()
      if centre == "private mean":
        a.compose(dp_accounting.GaussianDpEvent(4.0))
      a.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(s)), steps)
      return a.get_epsilon(1e-5)
    assert eps(sigma) <= 2.0 * 1.01 and eps(0.97 * sigma) > 2.0
  assert acc["private mean"] > 0.9 and acc["exact mean (not private)"] > 0.9
  assert acc["none"] < acc["private mean"] - 0.2
  # the steps' noise: one step at rate 1 on all-zero rows leaves only the bias row's gradient,
  # so every other weight is -lr * N(0, (sigma C)^2) / n: its spread is sigma C / n
  rows, sigma_t, clip_t = 2000, 3.0, 0.5
  w = feature_probe._dp_sgd(jax.random.key(5), jnp.zeros((rows, 2000)), jnp.zeros(rows, jnp.int32),
                            3, 1, 1.0, sigma_t, clip_t, 1.0, 0.0)
  assert float(jnp.std(w[:-1])) == pytest.approx(sigma_t * clip_t / rows, rel=0.05)
  # a centre noised so little that it alone spends the target: refused, naming the flag
  with pytest.raises(ValueError, match="--centre-sigma=1.5: the centre's release alone"):
    feature_probe.dp_probe(jax.random.key(1), x[:n], y[:n], x[n:], 3, epsilon=2.0,
                           centre="private mean", **(kw | {"centre_sigma": 1.5}))
