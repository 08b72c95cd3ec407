"""lora.first_layer: only the top layers train; the layers below get no gradient and no noise."""

import jax
import numpy as np
import pytest

from dplora_jax import lora as lora_lib
from dplora_jax.dp.mechanisms import ClientDP
from dplora_jax.federated import client as client_lib, round as round_lib
from tests import tiny


def _per_layer(tree):
  """Host copies of every leaf (each [L, ...])."""
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_gradients_match_the_full_model_above_and_are_exactly_zero_below():
  # the same weights and factors (perturbed: layer 0's B is nonzero, so it shapes the forward)
  g_full, lora, frozen = tiny.model_and_lora(first_layer=0)
  g_top, lora_top, frozen_top = tiny.model_and_lora(first_layer=1)
  for a, b in zip(_per_layer(lora), _per_layer(lora_top)):
    np.testing.assert_array_equal(a, b)
  ex = {k: v[0] for k, v in tiny.examples(1).items()}
  args = (ex["tokens"], ex["mask"], ex["targets"], ex["loss_mask"])
  loss_full, grad_full = jax.value_and_grad(client_lib.example_loss, argnums=1)(
      g_full, lora, frozen, *args)
  loss_top, grad_top = jax.value_and_grad(client_lib.example_loss, argnums=1)(
      g_top, lora_top, frozen_top, *args)
  np.testing.assert_allclose(loss_top, loss_full, rtol=1e-6)  # the forward is unchanged
  for full, top in zip(_per_layer(grad_full), _per_layer(grad_top)):
    assert np.all(top[0] == 0.0)
    assert np.abs(full[0]).max() > 0  # the full model does train layer 0
    np.testing.assert_allclose(top[1:], full[1:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mechanism,client_dp", [
    ("sample", None), ("paper", None), ("none", ClientDP(sum_noise=1.0, expected_clients=4.0))])
def test_noised_rounds_leave_the_layers_below_bitwise_at_their_initial_factors(mechanism,
                                                                               client_dp):
  step, state, args, (_, lora, _, _) = tiny.round_setup(
      num_clients=4, mechanism=mechanism, sigma=2.0, client_dp=client_dp, client_clip=0.5,
      paper_noise_std=0.5, steps=2 if mechanism == "sample" else 1, first_layer=1)
  initial = _per_layer(lora)
  for _ in range(2):
    state, _ = step(state, **args)
  for before, after in zip(initial, _per_layer(state.lora)):
    np.testing.assert_array_equal(after[0], before[0])  # no gradient and no noise below
    assert not np.array_equal(after[1], before[1])  # the layer above trains (noise included)


def test_zero_below_and_trained_params():
  tree = {"b": np.ones((3, 2, 4), np.float32), "a": np.ones((3, 5, 2), np.float32)}
  out = lora_lib.zero_below(tree, 2)
  for x in jax.tree.leaves(out):
    assert np.all(np.asarray(x)[:2] == 0) and np.all(np.asarray(x)[2:] == 1)
  assert lora_lib.zero_below(tree, 0) is tree
  assert lora_lib.trained_params(tree, 0) == 3 * 8 + 3 * 10
  assert lora_lib.trained_params(tree, 2) == 8 + 10


def test_first_layer_beyond_the_model_is_a_clear_error():
  with pytest.raises(ValueError, match=r"lora.first_layer=2; the model has 2 layers"):
    tiny.model_and_lora(first_layer=2)
  with pytest.raises(ValueError, match=r"lora.first_layer=-1"):
    lora_lib.LoRAConfig(first_layer=-1)


def test_a_round_on_the_cached_prefix_equals_the_round_that_recomputes_it():
  step, state, args, (graphdef, lora, frozen, _) = tiny.round_setup(
      num_clients=4, mechanism="sample", steps=2, first_layer=1)
  data = {k: np.asarray(v) for k, v in args["data"].items()}
  k, n, t = data["tokens"].shape
  hidden = lora_lib.frozen_prefix(graphdef, lora, frozen, data["tokens"].reshape(k * n, t),
                                  data["mask"].reshape(k * n, t))
  mesh = round_lib.make_mesh(1)
  cached = dict(args, data=dict(args["data"], hidden=round_lib.shard_clients(
      mesh, np.asarray(hidden).reshape(k, n, t, -1))))
  state_cached = jax.tree.map(jax.numpy.copy, state)
  # the cache is what the round reads: a wrong one gives another result
  wrong = dict(args, data=dict(cached["data"], hidden=jax.numpy.zeros_like(
      cached["data"]["hidden"])))
  state_wrong, _ = step(jax.tree.map(jax.numpy.copy, state), **wrong)
  for _ in range(2):
    state, _ = step(state, **args)
    state_cached, _ = step(state_cached, **cached)
  for a, b in zip(_per_layer(state.lora), _per_layer(state_cached.lora)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert any(not np.allclose(w, a) for a, w in zip(_per_layer(state.lora),
                                                   _per_layer(state_wrong.lora)))


def test_training_with_and_without_the_prefix_cache_gives_the_same_adapter(tmp_path,
                                                                           monkeypatch):
  import os
  import stat

  from configs import tiny as tiny_config
  from dplora_jax import config as config_lib, prefix_cache, train

  def cfg(cache, cache_dir="", examples=None):
    c = tiny_config.get_config("rounds=2,dp_seed=0,agg=ffa")  # only B trains: B0 stays 0
    with c.unlocked():
      c.lora.first_layer = 1
      c.model.cache_prefix = cache
      c.model.prefix_cache_dir = cache_dir
      if examples is not None:
        c.data.max_train_examples = examples
    return config_lib.from_config_dict(c)

  kept = str(tmp_path / "kept")
  results = {cache: train.run(cfg(cache, kept if cache else ""), str(tmp_path / str(cache)),
                              progress=False) for cache in (True, False)}
  cached, recomputed = (_per_layer(results[c].state.lora) for c in (True, False))
  for a, b in zip(cached, recomputed):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.all(a[0] == 0.0) and np.abs(a[1]).max() > 0  # B: layer 0 stays at its zero init
  # the activations were kept, owner-only; a second run on the same rows reads them (computing
  # is refused) and trains to the same adapter, bit for bit
  def kept_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("prefix-") and f.endswith(".npy"))
  files = kept_files(kept)
  assert len(files) == 1 and sorted(os.listdir(kept)) == sorted(files + ["key"])
  assert stat.S_IMODE(os.stat(kept).st_mode) == 0o700
  for f in (files[0], "key"):
    assert stat.S_IMODE(os.stat(os.path.join(kept, f)).st_mode) == 0o600
  assert os.path.getsize(os.path.join(kept, "key")) == 32
  real_compute = prefix_cache.compute

  def refuse(*a, **k):
    raise AssertionError("recomputed although kept")
  monkeypatch.setattr(prefix_cache, "compute", refuse)
  again = train.run(cfg(True, kept), str(tmp_path / "again"), progress=False)
  for a, b in zip(cached, _per_layer(again.state.lora)):
    np.testing.assert_array_equal(a, b)
  # other rows are another key: computed and kept beside, never read from the first file
  monkeypatch.setattr(prefix_cache, "compute", real_compute)
  train.run(cfg(True, kept, examples=320), str(tmp_path / "other"), progress=False)
  assert len(kept_files(kept)) == 2
  # the names are keyed by each directory's own secret: the same rows elsewhere get another name
  elsewhere = str(tmp_path / "elsewhere")
  train.run(cfg(True, elsewhere), str(tmp_path / "elsewhere_run"), progress=False)
  assert kept_files(elsewhere) and not set(kept_files(elsewhere)) & set(kept_files(kept))
  # a damaged file is recomputed and replaced, not read
  path = os.path.join(kept, files[0])
  with open(path, "r+b") as f:
    f.truncate(200)
  calls = []
  monkeypatch.setattr(prefix_cache, "compute", lambda *a, **k: calls.append(1) or
                      real_compute(*a, **k))
  train.run(cfg(True, kept), str(tmp_path / "damaged"), progress=False)
  assert calls and os.path.getsize(path) > 200
  # a key that is not one is refused, naming the field
  with open(os.path.join(kept, "key"), "wb") as f:
    f.write(b"short")
  with pytest.raises(ValueError, match="model.prefix_cache_dir: .* is not a 32-byte key"):
    prefix_cache._secret(kept)
  summary = results[True].summary
  assert summary["lora_params"] == lora_lib.trained_params(results[True].state.lora, 1)


def test_the_kept_prefix_key_covers_what_the_prefix_depends_on():
  """The key changes with the rows, the frozen weights and nonzero LoRA factors below the first
  trained layer (an adapter loaded with `lora.init_from`: the prefix then differs), and not with
  a random A below it whose B is zero (it adds exactly 0: replicates of other seeds share it)."""
  import dataclasses
  import types

  from configs import tiny as tiny_config
  from dplora_jax import config as config_lib, prefix_cache
  c = tiny_config.get_config("rounds=1")
  with c.unlocked():
    c.lora.first_layer = 1
  cfg = config_lib.from_config_dict(c)
  ex = tiny.examples(6)
  stacked = {k: v[None] for k, v in ex.items()}  # one slot of 6 rows

  def setup(lora_seed=0, perturb=False, cfg=cfg, frozen_scale=1.0):
    g, _, frozen = tiny.model_and_lora(first_layer=1)
    _, lora, _ = tiny.model_and_lora(seed=lora_seed, perturb=perturb, first_layer=1)
    frozen = jax.tree.map(lambda a: a * frozen_scale, frozen)
    return types.SimpleNamespace(cfg=cfg, graphdef=g, lora=lora, frozen=frozen, clients=[range(6)])

  secret = b"k" * 32
  key = lambda s, st=stacked: prefix_cache.key(s, st, None, secret)
  base = setup()
  assert key(setup(lora_seed=1)) == key(base)  # another random A below, B = 0 there
  assert key(setup(perturb=True)) != key(base)  # nonzero B below: another prefix
  assert not np.allclose(prefix_cache.compute(setup(perturb=True), stacked, None, chunk=8),
                         prefix_cache.compute(base, stacked, None, chunk=8))
  assert key(setup(frozen_scale=1.01)) != key(base)
  other = dict(stacked, tokens=stacked["tokens"].copy())
  other["tokens"][0, 3, 0] += 1
  assert key(base, other) != key(base)
  assert prefix_cache.key(base, stacked, None, b"j" * 32) != key(base)
  other_model = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                   attention="dot_product"))
  assert key(setup(cfg=other_model)) != key(base)
  execution_only = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=True))
  assert key(setup(cfg=execution_only)) == key(base)


def test_the_prefix_line_does_not_tell_the_largest_client_size():
  from dplora_jax import prefix_cache
  small, large = np.zeros((4, 10, 48, 16), np.float32), np.zeros((4, 37, 48, 16), np.float32)
  assert prefix_cache.progress_line(3, "computed", small, 2.0) == \
      prefix_cache.progress_line(3, "computed", large, 2.0)
