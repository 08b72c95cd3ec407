"""The federated round: one program, device-count invariance, hand-computed rounds, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dplora_jax.federated import round as round_lib
from tests import tiny


def _setup(num_clients=8, n=6, steps=1, bmax=4, private=True, sigma=1.0, clip=0.1, lr=0.5,
           devices=1, weights=None, diagnostics=False, server_tx=None):
  graphdef, lora, frozen = tiny.model_and_lora()
  spec = tiny.client_spec("sample" if private else "none", clip=clip, sigma=sigma, divisor=3,
                          microbatch=2, steps=steps, diagnostics=diagnostics)
  mesh = round_lib.make_mesh(devices)
  server_tx = server_tx or round_lib.make_server_optimizer("fedavg", 1.0)
  step = round_lib.make_round_step(graphdef, spec, optax.sgd(lr), server_tx, mesh)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, n, (num_clients, steps, bmax)).astype(np.int32)
  valid = rng.random((num_clients, steps, bmax)) < 0.7
  w = np.ones(num_clients, np.float32) if weights is None else np.asarray(weights, np.float32)
  args = dict(frozen=round_lib.replicate(mesh, frozen),
              data=round_lib.shard_clients(mesh, tiny.client_data(num_clients, n)),
              idx=round_lib.shard_clients(mesh, idx), valid=round_lib.shard_clients(mesh, valid),
              weights=round_lib.shard_clients(mesh, w),
              client_ids=round_lib.shard_clients(mesh, np.arange(num_clients, dtype=np.int32)),
              noise_key=jax.random.key(42))
  state = round_lib.replicate(mesh, round_lib.init_state(lora, server_tx))
  return step, state, args, (graphdef, lora, frozen, spec)


def _leaves(t):
  return [np.asarray(x) for x in jax.tree.leaves(t)]


def test_one_device_equals_eight_devices():
  assert jax.device_count() >= 8
  step1, state1, args1, _ = _setup(devices=1, steps=2, diagnostics=True)
  step8, state8, args8, _ = _setup(devices=8, steps=2, diagnostics=True)
  out1, m1 = step1(state1, **args1)
  out8, m8 = step8(state8, **args8)
  for a, b in zip(_leaves(out1.lora), _leaves(out8.lora)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  d1, d8 = m1["diagnostics"], m8["diagnostics"]
  assert float(d1["loss"]) == pytest.approx(float(d8["loss"]), abs=1e-6)


def test_compiled_once_and_one_program():
  step, state, args, _ = _setup(devices=8)
  for _ in range(3):
    state, _ = step(state, **args)
  assert step._cache_size() == 1
  assert int(state.round) == 3
  text = step.lower(state, **args).as_text()
  # steps and microbatches are loops in the program, not unrolled Python loops
  assert text.count("stablehlo.while") >= 2
  # program size does not grow with the number of clients or local steps
  small = _setup(num_clients=8, steps=1, devices=8)
  big = _setup(num_clients=16, steps=3, devices=8)
  n_small = len(jax.make_jaxpr(small[0])(small[1], **small[2]).eqns)
  n_big = len(jax.make_jaxpr(big[0])(big[1], **big[2]).eqns)
  assert n_small == n_big


def test_padded_clients_contribute_exactly_zero():
  w = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  step, state, args, _ = _setup(weights=w)
  out, m = step(state, **args)
  # change the padded clients' data completely: nothing moves
  step2, state2, args2, _ = _setup(weights=w)
  data = {k: np.asarray(v).copy() for k, v in args2["data"].items()}
  data["tokens"][5:] = (data["tokens"][5:] + 17) % tiny.ARCH.vocab_size
  args2["data"] = round_lib.shard_clients(round_lib.make_mesh(1), data)
  out2, m2 = step2(state2, **args2)
  for a, b in zip(_leaves(out.lora), _leaves(out2.lora)):
    np.testing.assert_array_equal(a, b)
  assert float(m["public"]["participants"]) == 5


def test_hand_computed_two_client_non_private_round():
  step, state, args, (graphdef, lora, frozen, spec) = _setup(
      num_clients=2, private=False, lr=0.3, weights=[2.0, 6.0])
  out, _ = step(state, **args)
  data = {k: np.asarray(v) for k, v in args["data"].items()}
  idx, valid = np.asarray(args["idx"]), np.asarray(args["valid"])
  want_delta = jax.tree.map(jnp.zeros_like, lora)
  for k, w in enumerate([2.0, 6.0]):
    rows = idx[k, 0][valid[k, 0]]

    g = tiny.mean_grad(graphdef, lora, frozen, {f: data[f][k, rows] for f in tiny.FIELDS})
    want_delta = jax.tree.map(lambda d, gi: d + (w / 8.0) * (-0.3 * gi), want_delta, g)
  for a, l, d in zip(_leaves(out.lora), _leaves(lora), _leaves(want_delta)):
    np.testing.assert_allclose(a, l + d, atol=1e-6)


def test_server_momentum_is_fedavgm():
  """fed.server_momentum m: the second round's step is the plain average's plus m times the first
  round's (heavy ball on the negated average delta; the first round equals plain averaging)."""
  plain = _setup(num_clients=2, private=False, lr=0.3)
  mom = _setup(num_clients=2, private=False, lr=0.3,
               server_tx=round_lib.make_server_optimizer("fedavg", 1.0, momentum=0.5))
  (step_p, s_p, args_p, (_, lora0, _, _)), (step_m, s_m, args_m, _) = plain, mom
  s_p1, _ = step_p(s_p, **args_p)
  s_m1, _ = step_m(s_m, **args_m)
  for a, b in zip(_leaves(s_p1.lora), _leaves(s_m1.lora)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  lora1 = _leaves(s_p1.lora)
  s_p2, _ = step_p(s_p1, **args_p)
  s_m2, _ = step_m(s_m1, **args_m)
  for p2, m2, l1, l0 in zip(_leaves(s_p2.lora), _leaves(s_m2.lora), lora1, _leaves(lora0)):
    np.testing.assert_allclose(m2, p2 + 0.5 * (l1 - l0), atol=1e-6)
  with pytest.raises(ValueError, match="fed.server_momentum=0.9"):
    round_lib.make_server_optimizer("fedadam", 0.01, momentum=0.9)


def test_fedadam_epsilon_is_the_configured_tau():
  """fed.server_adam_eps reaches the server optimizer: Adam's first step on an average delta d
  is lr d / (|d| + tau) per coordinate (bias-corrected moments equal d and d^2)."""
  from dplora_jax import config as config_lib
  d = {"b": jnp.array([1e-3, -2e-2, 0.5])}
  for tau in (1e-3, 1e-1):
    fed = config_lib.FedConfig(server_optimizer="fedadam", server_lr=0.1, server_adam_eps=tau)
    tx = round_lib.server_optimizer(fed)
    grad = jax.tree.map(jnp.negative, d)  # the server descends on the negated average delta
    upd, _ = tx.update(grad, tx.init(d), d)
    np.testing.assert_allclose(upd["b"], 0.1 * d["b"] / (jnp.abs(d["b"]) + tau), rtol=1e-5)


def test_cosine_server_lr_decay_scales_each_rounds_step():
  """fed.server_lr_decay='cosine' over 3 rounds: round t's step is the plain average's from the
  same LoRA times (1 + cos(pi t / 3)) / 2 (t = 0, 1, 2)."""
  step_p, _, args_p, _ = _setup(num_clients=2, private=False, lr=0.3)
  step_d, s_d, args_d, _ = _setup(
      num_clients=2, private=False, lr=0.3,
      server_tx=round_lib.make_server_optimizer("fedavg", 1.0, decay="cosine", rounds=3))
  mesh, plain_tx = round_lib.make_mesh(1), round_lib.make_server_optimizer("fedavg", 1.0)
  for t in range(3):
    before = _leaves(s_d.lora)
    want, _ = step_p(round_lib.replicate(mesh, round_lib.init_state(s_d.lora, plain_tx)),
                     **args_p)
    s_d, _ = step_d(s_d, **args_d)
    factor = (1 + np.cos(np.pi * t / 3)) / 2
    for b, w, g in zip(before, _leaves(want.lora), _leaves(s_d.lora)):
      np.testing.assert_allclose(g, b + factor * (w - b), atol=1e-6, err_msg=f"round {t}")
  with pytest.raises(ValueError, match="fed.server_lr_decay='step'"):
    round_lib.make_server_optimizer("fedavg", 1.0, decay="step")


def test_one_client_equals_centralized_sgd():
  steps = 3
  step, state, args, (graphdef, lora, frozen, spec) = _setup(
      num_clients=1, private=False, lr=0.2, steps=steps)
  out, _ = step(state, **args)
  data = {k: np.asarray(v)[0] for k, v in args["data"].items()}
  idx, valid = np.asarray(args["idx"])[0], np.asarray(args["valid"])[0]
  params = lora
  for s in range(steps):
    rows = idx[s][valid[s]]
    batch = {k: data[k][rows] for k in tiny.FIELDS}
    params = jax.tree.map(lambda p, g: p - 0.2 * g, params,
                          tiny.mean_grad(graphdef, params, frozen, batch))
  for a, b in zip(_leaves(out.lora), _leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


_NOISE_SETUPS = {}


def _noise_only_delta(client, rnd, steps=1):
  """The global update when only `client` has weight and no example is sampled: pure noise.

  One compiled round per `steps`; the client's weight and the round are inputs."""
  if steps not in _NOISE_SETUPS:
    _NOISE_SETUPS[steps] = _setup(num_clients=4, weights=np.zeros(4), lr=1.0, steps=steps,
                                  sigma=1.0, clip=0.1)
  step, state, args, (_, lora, _, spec) = _NOISE_SETUPS[steps]
  mesh = round_lib.make_mesh(1)
  w = np.zeros(4, np.float32)
  w[client] = 1.0
  args = dict(args, weights=round_lib.shard_clients(mesh, w),
              valid=round_lib.shard_clients(mesh, np.zeros((4, steps, 4), bool)))
  state = round_lib.replicate(mesh, round_lib.init_state(lora, round_lib.make_server_optimizer(
      "fedavg", 1.0)))._replace(round=jnp.int32(rnd))
  out, _ = step(state, **args)
  return np.concatenate([np.ravel(a - b) for a, b in zip(_leaves(out.lora), _leaves(lora))])


def test_noise_std_and_no_shared_noise_across_clients_rounds_steps():
  draws = {(c, r): _noise_only_delta(c, r) for c in range(3) for r in range(2)}
  d = next(iter(draws.values())).size
  # std = lr * sigma * C / B
  x = np.concatenate(list(draws.values()))
  n = x.size
  lo = (n - 1) * x.var(ddof=1) / stats.chi2.ppf(0.9995, n - 1)
  hi = (n - 1) * x.var(ddof=1) / stats.chi2.ppf(0.0005, n - 1)
  assert lo <= (1.0 * 0.1 / 3) ** 2 <= hi
  keys = list(draws)
  for i in range(len(keys)):
    for j in range(i + 1, len(keys)):
      assert abs(np.corrcoef(draws[keys[i]], draws[keys[j]])[0, 1]) < 5 / np.sqrt(d)
  # step 2 of a round draws fresh noise: delta(S=2) - delta(S=1) is independent of delta(S=1)
  one, two = _noise_only_delta(0, 0, steps=1), _noise_only_delta(0, 0, steps=2)
  assert abs(np.corrcoef(one, two - one)[0, 1]) < 5 / np.sqrt(d)
  assert np.std(two - one) == pytest.approx(np.std(one), rel=0.2)
