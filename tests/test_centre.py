"""Centred LoRA (`lora.centre`): the layer, the captured inputs, the release, its accounting, and
a run that writes its centre once."""

import functools
import os

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from flax import nnx

from configs import tiny
from dplora_jax import build as build_lib, config as config_lib, export, lora as lora_lib
from dplora_jax import report, train
from dplora_jax.deploy import protocol
from dplora_jax.dp import plan as plan_lib, statistics
from dplora_jax.federated import centre as centre_lib
from dplora_jax.models import ModelConfig, build_model, layers

ARCH = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, intermediate_size=48)
TOKENS = np.random.default_rng(0).integers(0, 64, (3, 9)).astype(np.int32)
MASK = np.arange(9)[None] < np.array([[9], [6], [4]])


def _centred(first_layer=0, targets=("q", "v", "down"), how="tokens"):
  model = build_model(ARCH)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4, targets=targets, centre=how,
                                               first_layer=first_layer), jax.random.key(0))
  for dense in lora_lib.adapted_denses(model).values():  # B = 0 would test nothing
    dense.lora_b = layers.LoRAParam(0.1 * jax.random.normal(jax.random.key(1),
                                                            dense.lora_b[...].shape))
  return model


def test_a_centred_layer_computes_x_minus_c_and_merges_into_a_bias():
  model = _centred()
  dense = model.layers.attn.v
  c = jax.random.normal(jax.random.key(2), dense.lora_centre[...].shape)
  lora_lib.set_centre(model, {"v": c})
  x = jax.random.normal(jax.random.key(3), (2, 5, 32))
  one = nnx.merge(*nnx.split(model.layers.attn))  # layer 0 by hand
  w, a, b = (np.asarray(v[...][0]) for v in (dense.kernel, dense.lora_a, dense.lora_b))
  want = np.asarray(x) @ w + dense.lora_scaling * ((np.asarray(x) - np.asarray(c[0])) @ a) @ b
  gd, st = nnx.split(one.v)
  got = nnx.merge(gd, jax.tree.map(lambda t: t[0], st))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the centre changes the output (by -s (c A) B), and merging folds exactly that into a bias
  centred = np.asarray(model(TOKENS, MASK))
  lora_lib.set_centre(model, {"v": jnp.zeros_like(c)})
  assert np.abs(np.asarray(model(TOKENS, MASK)) - centred).max() > 1e-3
  lora_lib.set_centre(model, {"v": c})
  merged = lora_lib.merge_lora(model)
  assert merged.layers.attn.v.bias is not None and merged.layers.attn.q.bias is not None
  np.testing.assert_allclose(np.asarray(merged(TOKENS, MASK)), centred, atol=2e-5)
  with pytest.raises(ValueError, match="shape"):
    lora_lib.set_centre(model, {"v": c[:, :3]})


@pytest.mark.parametrize("first_layer", [0, 1])
def test_captured_inputs_are_each_trained_layers_weighted_mean_input(first_layer):
  """`input_sums` (one scan, the capture) against a loop over the layers by hand; with the
  cached frozen prefix it gives the same."""
  model = _centred(first_layer)
  graphdef, lora, frozen = lora_lib.split(model)
  weights = MASK / MASK.sum(1, keepdims=True)
  got = lora_lib.input_sums(graphdef, lora, frozen, TOKENS, MASK, weights)
  assert {k: v.shape for k, v in got.items()} == {
      "q": (3 - first_layer, 3, 32), "v": (3 - first_layer, 3, 32),
      "down": (3 - first_layer, 3, 48)}
  gd, st = nnx.split(model.layers)
  positions = jnp.maximum(jnp.cumsum(MASK, -1) - 1, 0)
  inv = layers.rope_frequencies(8, ARCH.rope_theta, ARCH.rope_scaling)
  x = model.embed(TOKENS)
  for l in range(3):
    block = nnx.merge(gd, jax.tree.map(lambda t: t[l], st))
    h = block.attn_norm(x)
    attn, _ = block.attn(h, positions, inv, MASK, jnp.arange(9), None)
    mid = x + attn
    m = block.mlp_norm(mid)
    act = jax.nn.silu(block.mlp.gate(m)) * block.mlp.up(m)
    if l >= first_layer:
      for name, inp in (("q", h), ("v", h), ("down", act)):
        want = np.einsum("bt,btf->bf", weights, np.asarray(inp))
        np.testing.assert_allclose(got[name][l - first_layer], want, rtol=1e-5, atol=1e-6)
    x = mid + block.mlp(m)
  if first_layer:
    hidden = lora_lib.frozen_prefix(graphdef, lora, frozen, TOKENS, MASK)
    cached = lora_lib.input_sums(graphdef, lora, frozen, TOKENS, MASK, weights, hidden)
    for k in got:
      np.testing.assert_allclose(cached[k], got[k], rtol=1e-5, atol=1e-6)


def _tiny(*extra, arg="rounds=2"):
  c = tiny.get_config(arg)
  with c.unlocked():
    c.lora.targets = ("q", "v", "down")
    c.lora.first_layer = 1
    for k, v in extra:
      section, field = k.split(".")
      setattr(getattr(c, section), field, v)
  return config_lib.from_config_dict(c)


def test_the_centre_is_every_clients_mean_input_and_its_noise_is_where_dp_noise_at_says():
  cfg = _tiny(("lora.centre", "loss"), ("dp.mode", "none"), ("lora.centre_clip", 100.0),
              arg="rounds=2,examples=40,batch=4")
  s = build_lib.build(cfg)
  stacked = train._stack_clients(s.clients, len(s.clients))
  got = centre_lib.compute(cfg, s, stacked, jax.random.key(0))
  # by hand: every example's mean over its loss positions, one example at a time, averaged
  rows = {k: [] for k in got}
  one_row = jax.jit(functools.partial(lora_lib.input_sums, s.graphdef))
  for i, client in enumerate(s.clients):
    for j in range(len(client)):
      w = stacked["loss_mask"][i, j:j + 1].astype(np.float32)
      one = one_row(s.lora, s.frozen, stacked["tokens"][i, j:j + 1], stacked["mask"][i, j:j + 1],
                    w / w.sum())
      for k, v in one.items():
        rows[k].append(np.asarray(v)[:, 0])
  for k, v in got.items():
    assert not v[0].any()  # below lora.first_layer: no centre
    np.testing.assert_allclose(v[1:], np.mean(rows[k], axis=0), rtol=2e-4, atol=1e-5)
  # the release: each client noises (K draws of sigma on the total) or the aggregator once
  zeros = [({"x": np.zeros(4000)}, 0.0)] * 4
  for at, std in (("client", 2.0 * 3.0), ("server", 3.0)):
    sums, count = centre_lib.release(zeros, 3.0, at, jax.random.key(5))
    assert np.std(sums["x"]) == pytest.approx(std, rel=0.05)
  a, _ = centre_lib.release(zeros, 3.0, "client", jax.random.key(5))
  b, _ = centre_lib.release(zeros, 3.0, "client", jax.random.key(6))
  assert np.corrcoef(a["x"], b["x"])[0, 1] < 0.1  # the run's secret key decides the noise


def test_the_plan_composes_the_centres_gaussian_into_the_example_guarantee(capsys):
  """eps of the plan == dp-accounting's RDP of Gaussian(sigma_c) composed with the steps'
  sampled Gaussians, computed here; the centre is not free (eps without it is lower)."""
  cfg = _tiny(("lora.centre", "tokens"), ("dp.centre_noise_multiplier", 3.0), arg="rounds=4")
  plan = plan_lib.make_plan(cfg)
  mech = plan.get("example")
  assert [s.source for s in mech.prior] == ["lora centre"]
  q, sigma, steps = mech.sampling_rate, mech.noise_multiplier, 4 * cfg.fed.local_steps
  orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
  acc = rdp.RdpAccountant(orders)
  acc.compose(dp_accounting.GaussianDpEvent(3.0))
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert mech.epsilon == pytest.approx(acc.get_epsilon(mech.accountant_delta), rel=1e-3)
  bare = rdp.RdpAccountant(orders)
  bare.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert bare.get_epsilon(mech.accountant_delta) < mech.epsilon - 0.05
  assert plan_lib.make_plan(_tiny(arg="rounds=4")).get("example").noise_multiplier < sigma
  # launch.privacy states it
  from launch import privacy
  assert privacy.main(["--config", "configs/tiny.py:rounds=4", "--config.lora.centre=tokens",
                       "--config.dp.centre_noise_multiplier=3"]) == 0
  assert "includes the LoRA centre's release before round 1" in capsys.readouterr().out
  # with a trusted aggregator, it names the centre's un-noised sums among what that party sees
  assert privacy.main(["--config", "configs/tiny.py:rounds=4,steps=1", "--config.lora.centre=tokens",
                       "--config.dp.noise_at=server"]) == 0
  assert "un-noised sums for the LoRA centre" in capsys.readouterr().out
  text = "\n".join(report.privacy_lines([m.to_dict() for m in plan_lib.make_plan(_tiny(
      ("lora.centre", "tokens"), ("dp.noise_at", "server"), arg="rounds=4,steps=1")).mechanisms]))
  assert "un-noised sums for the LoRA centre and must be trusted" in text


def test_a_centred_run_releases_its_centre_once_per_workdir(tmp_path):
  cfg = _tiny(("lora.centre", "tokens"))
  w = str(tmp_path / "run")
  res = train.run(cfg, w, progress=False)
  path = os.path.join(w, centre_lib.CENTRE_FILE)
  assert oct(os.stat(path).st_mode & 0o777) == "0o600"
  first = centre_lib.load(w, cfg)
  assert first["q"][1].any() and not first["q"][0].any()
  segs = res.summary["ledger"]["entries"][0]["segments"]
  assert [g["source"] for g in segs] == ["lora centre", "this run"]
  # the model that trained and evaluated carried exactly that centre
  trained = lora_lib.merge(res.setup.graphdef, res.lora, res.setup.frozen)
  np.testing.assert_array_equal(np.asarray(lora_lib.centres(trained)["q"]), first["q"])
  # the export and launch.eval --workdir load the model with it
  exported, *_ = export.load_trained(w)
  np.testing.assert_array_equal(np.asarray(lora_lib.centres(exported)["down"]), first["down"])
  # a restart before any checkpoint (new secret root) reuses the released centre, not a new one
  import shutil
  shutil.rmtree(os.path.join(w, "checkpoints"))
  train.run(cfg, w, progress=False)
  np.testing.assert_array_equal(centre_lib.load(w, cfg)["q"], first["q"])
  # a resume whose centre is gone refuses (another release would not be accounted) ...
  os.rename(path, path + ".away")
  with pytest.raises(ValueError, match="is missing"):
    train.run(cfg, w, progress=False)
  os.rename(path + ".away", path)
  # ... and a centre of another config is not used
  other = _tiny(("lora.centre", "tokens"), ("lora.centre_clip", 3.0))
  with pytest.raises(ValueError, match="another config.*lora.centre_clip"):
    centre_lib.load(w, other)
  with pytest.raises(ValueError, match="not deployable"):
    protocol.check_deployable(cfg)


def test_zero_a_labels_is_built_from_the_tasks_label_words_and_refused_elsewhere():
  cfg = _tiny(("lora.init", "zero_a_labels"), ("lora.targets", ("v", "down")))
  model, tok, _, _ = build_lib.load_base(cfg)
  build_lib.attach_lora(model, cfg, tok)
  ids = build_lib.tasks.get("tfns").label_tokens(tok, cfg.data)
  rows = np.asarray(lora_lib.output_rows(model, ids))
  b = np.asarray(model.layers.mlp.down.lora_b[...])[1, :len(ids)]
  cos = np.sum(b * rows, 1) / np.linalg.norm(b, axis=1) / np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="needs the model's tokenizer"):
    build_lib.attach_lora(build_lib.load_base(cfg)[0], cfg)
  other = _tiny(("lora.init", "zero_a_labels"), ("lora.targets", ("down",)), ("data.task", "boolq"))
  with pytest.raises(ValueError, match="data.task='boolq' is 'choice'"):
    build_lib.attach_lora(build_lib.load_base(other)[0], other, tok)


def test_the_released_centre_carries_the_noise_the_plan_accounts():
  """Two releases of the same data under different keys differ by the noise only: its std,
  in the sums' units, is sqrt(2 K) sigma with the plan's centre sigma (each of K clients noises)."""
  cfg = _tiny(("lora.centre", "tokens"), ("dp.centre_noise_multiplier", 3.0))
  sigma = plan_lib.make_plan(cfg).get("example").prior[0].noise_multiplier
  s = build_lib.build(cfg)
  stacked = train._stack_clients(s.clients, len(s.clients))
  a, b = (centre_lib.compute(cfg, s, stacked, jax.random.key(k)) for k in (0, 1))
  vocab = lora_lib.merge(s.graphdef, s.lora, s.frozen).config.vocab_size
  bound = centre_lib.bounds(cfg, s, vocab)
  n = sum(len(c) for c in s.clients)
  k = cfg.fed.num_clients
  z = np.concatenate([((a[t][1:] - b[t][1:]).reshape(-1) / bound[t]) for t in a])
  z = z * statistics.COUNT * n  # back to the released sums' units
  assert np.std(z) == pytest.approx(np.sqrt(2 * k) * sigma, rel=0.2)
