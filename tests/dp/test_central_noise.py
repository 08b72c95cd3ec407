"""dp.noise_at='server': the aggregator noises the sum of the clients' clipped sums once.

The round against a hand computation (clipped per-example gradients, one Gaussian from the
server's key), its sensitivity to one example, the accounting against dp-accounting from first
principles, and the paths that must refuse it (a client's local step, a deployment, configs)."""

import dataclasses

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from dplora_jax import build, config as config_lib, report, train
from dplora_jax.deploy import protocol
from dplora_jax.dp import noise
from dplora_jax.dp.mechanisms import CentralDPSGD
from dplora_jax.federated import client as client_lib, round as round_lib
from tests import tiny

K, LR, SIGMA, CLIP, B = 3, 0.5, 1.3, 0.1, 3.0


@pytest.fixture(scope="module")
def central_round():
  return tiny.round_setup(num_clients=K, lr=LR, sigma=SIGMA, clip=CLIP, noise_at="server")


def _clipped_sum_by_hand(graphdef, lora, frozen, data, idx, valid):
  """sum over clients and valid sampled rows of each example gradient clipped to C (float64)."""
  total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), lora)
  for k in range(idx.shape[0]):
    for i, ok in zip(idx[k, 0], valid[k, 0]):
      if not ok:
        continue
      g = tiny.example_grad(graphdef, lora, frozen, *(data[f][k, i] for f in tiny.FIELDS))
      norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
      scale = min(1.0, CLIP / norm)
      total = jax.tree.map(lambda t, x: t + scale * np.asarray(x, np.float64), total, g)
  return total


def _run(step, state, args, **changes):
  out, metrics = step(jax.tree.map(jnp.copy, state), **dict(args, **changes))
  return out, metrics


def test_the_round_releases_one_gaussian_on_the_sum_of_clipped_sums(central_round):
  step, state, args, (graphdef, lora, frozen, spec) = central_round
  assert spec.noise_at == "server"
  out, metrics = _run(step, state, args)
  data = {k: np.asarray(v) for k, v in args["data"].items()}
  idx, valid = np.asarray(args["idx"]), np.asarray(args["valid"])
  assert valid[:, 0].any(axis=1).all()
  clean = _clipped_sum_by_hand(graphdef, lora, frozen, data, idx, valid)
  # the one Gaussian: std sigma C, from the server's round key, fold 2 (no client key is used)
  _, server_key = round_lib.round_keys(args["noise_key"], jnp.int32(0))
  z = noise.gaussian_noise_like(jax.random.fold_in(server_key, 2), lora, SIGMA * CLIP)
  for new, old, c, n in zip(tiny.leaves(out.lora), tiny.leaves(lora), jax.tree.leaves(clean),
                            tiny.leaves(z)):
    want = old - LR * (c + n) / (B * K)  # FedAvg (server lr 1) of each client's SGD step
    np.testing.assert_allclose(new, want, atol=2e-6)
  assert float(metrics["public"]["participants"]) == K
  assert metrics["diagnostics"] == {}  # nothing private leaves by default


def test_noise_std_is_sigma_c_once_not_per_client(central_round):
  """With no example sampled the update is pure noise: its std is lr sigma C / (B K), i.e.
  sqrt(K) below the average of K client-noised releases (lr sigma C / (B sqrt(K)))."""
  step, state, args, (_, lora, _, _) = central_round
  mesh = round_lib.make_mesh(1)
  valid = round_lib.shard_clients(mesh, np.zeros(np.asarray(args["valid"]).shape, bool))
  draws = []
  for r in range(6):
    out, _ = _run(step, state._replace(round=jnp.int32(r)), args, valid=valid)
    draws.append(np.concatenate([np.ravel(a - b) for a, b in zip(tiny.leaves(out.lora),
                                                                 tiny.leaves(lora))]))
  draws = np.concatenate(draws)
  want = LR * SIGMA * CLIP / (B * K)
  # chi-square: the sample std of n normals is within 5 / sqrt(2n) of the truth (relative)
  assert abs(draws.std() / want - 1) < 5 / np.sqrt(2 * draws.size)
  assert abs(draws.mean()) < 5 * want / np.sqrt(draws.size)


def test_one_more_example_moves_the_pre_noise_release_by_at_most_lr_c_over_bk():
  step, state, args, (graphdef, lora, frozen, spec) = tiny.round_setup(
      num_clients=K, lr=LR, sigma=0.0, clip=CLIP, noise_at="server")
  mesh = round_lib.make_mesh(1)
  valid = np.asarray(args["valid"]).copy()
  base, _ = _run(step, state, args)
  for k in range(K):
    free = np.flatnonzero(~valid[k, 0])
    if not len(free):
      continue
    more = valid.copy()
    more[k, 0, free[0]] = True
    out, _ = _run(step, state, args, valid=round_lib.shard_clients(mesh, more))
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(tiny.leaves(out.lora),
                                                            tiny.leaves(base.lora))))
    assert 0 < moved <= LR * CLIP / (B * K) * (1 + 1e-5)


def test_accounting_is_the_client_noised_event_checked_from_first_principles():
  def plan(noise_at, **kw):
    c = tiny_config.get_config("steps=1,examples=200,clients=4,batch=10,rounds=5")
    with c.unlocked():
      c.dp.noise_at = noise_at
      c.dp.accountant = "pld"
      c.dp.truncation = "delta"  # the untruncated Poisson event: dp-accounting's own
      for key, v in kw.items():
        setattr(c.dp, key, v)
    return build.privacy_plan(config_lib.from_config_dict(c))

  server, client = plan("server"), plan("client")
  assert server.central.dpsgd == server.dpsgd == client.dpsgd and client.central is None
  assert server.central.client_lr == 2.0  # configs/tiny.py's optim.learning_rate
  ms, mc = server.get("example"), client.get("example")
  assert (ms.noise_multiplier, ms.sampling_rate, ms.epsilon) == (
      mc.noise_multiplier, mc.sampling_rate, mc.epsilon)
  assert ms.details["noise_at"] == "server" and "trusted" in ms.details["note"]
  # from first principles: 5 Poisson(q = 10 / 50) sampled Gaussians at the plan's sigma
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      10 / 50, dp_accounting.GaussianDpEvent(ms.noise_multiplier)), 5)
  acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  want = acc.compose(event).get_epsilon(ms.accountant_delta)
  assert ms.epsilon == pytest.approx(want, rel=1e-2)
  assert ms.epsilon == pytest.approx(8.0, rel=1e-3)


def test_paths_that_would_release_an_unnoised_update_refuse():
  graphdef, lora, frozen = tiny.model_and_lora()
  spec = dataclasses.replace(tiny.client_spec(), noise_at="server")
  data = {k: jnp.asarray(v) for k, v in tiny.examples(4).items()}
  idx, valid = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  import optax
  with pytest.raises(ValueError, match="never an un-noised local step"):
    client_lib.local_train(graphdef, spec, optax.sgd(1.0), lora, frozen, data, idx, valid,
                           jax.random.key(0))
  with pytest.raises(ValueError, match="needs both"):
    round_lib.make_round_step(graphdef, spec, optax.sgd(1.0),
                              round_lib.make_server_optimizer("fedavg", 1.0),
                              round_lib.make_mesh(1))
  with pytest.raises(ValueError, match="one local step"):
    dataclasses.replace(spec, local_steps=2)
  cfg = config_lib.from_config_dict(tiny_config.get_config("steps=1"))
  cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_at="server"))
  with pytest.raises(ValueError, match="not deployable"):
    protocol.check_deployable(cfg)


@pytest.mark.parametrize("arg, field", [("steps=2", "fed.local_steps"),
                                        ("steps=1,mode=client", "dp.noise_at"),
                                        ("steps=1,mode=paper", "dp.noise_at")])
def test_configs_it_cannot_serve_name_the_field(arg, field):
  c = tiny_config.get_config(arg)
  with c.unlocked():
    c.dp.noise_at = "server"
  with pytest.raises(ValueError, match=field):
    config_lib.from_config_dict(c)
  c = tiny_config.get_config("steps=1")
  with c.unlocked():
    c.dp.noise_at = "server"
    c.optim.optimizer = "adamw"
  with pytest.raises(ValueError, match="optim.optimizer"):
    config_lib.from_config_dict(c)


def test_a_run_trains_and_its_summary_names_the_trusted_aggregator(tmp_path):
  c = tiny_config.get_config("steps=1,rounds=2")
  with c.unlocked():
    c.dp.noise_at = "server"
  s = train.run(config_lib.from_config_dict(c), str(tmp_path), progress=False).summary
  text = report.format_summary(s)
  assert "noise added once by the aggregator" in text and "must be trusted" in text
  [mech] = s["privacy"]
  assert mech["details"]["noise_at"] == "server" and mech["epsilon_spent"] <= 8.0 + 1e-6
