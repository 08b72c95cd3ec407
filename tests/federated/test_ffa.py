"""fed.aggregation = "ffa" (FFA-LoRA): A frozen and never sent, exact aggregation, half the upload."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny as tiny_config
from dplora_jax import config as config_lib, lora as lora_lib, train
from dplora_jax.dp.mechanisms import ClientDP
from dplora_jax.federated import client as client_lib
from tests import tiny


def _frozen_a(frozen):
  """{path: host copy of A} of the frozen tree (FFA keeps A there)."""
  flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
  return {jax.tree_util.keystr(p): np.array(x, copy=True) for p, x in flat if "lora_a" in
          jax.tree_util.keystr(p)}


@pytest.mark.parametrize("mechanism,client_dp", [
    ("none", None), ("sample", None), ("paper", None),
    ("sample", ClientDP(sum_noise=1.0, expected_clients=4.0))])
def test_a_is_bitwise_unchanged_and_only_b_trains_in_every_mode(mechanism, client_dp):
  step, state, args, (graphdef, lora, frozen, spec) = tiny.round_setup(
      num_clients=4, mechanism=mechanism, freeze_a=True, client_dp=client_dp, client_clip=0.5,
      paper_noise_std=0.01, steps=1 if mechanism == "paper" else 2)
  assert set(jax.tree.leaves(lora_lib.factor_of(lora))) == {"b"}  # A never travels
  # the reference A comes from an independent rebuild of the same init, not from the inputs
  a_init = _frozen_a(tiny.model_and_lora(freeze_a=True)[2])
  assert a_init and all(np.abs(a).max() > 0 for a in a_init.values())
  for _ in range(3):
    state, _ = step(state, **args)
  # the round returns no A, and the frozen tree the clients used is still the initial A
  assert set(jax.tree.leaves(lora_lib.factor_of(state.lora))) == {"b"}
  a_used = _frozen_a(args["frozen"])
  assert set(a_used) == set(a_init)
  for k in a_init:
    np.testing.assert_array_equal(a_init[k], a_used[k])
  # and the model the released LoRA defines computes with that A: merge and read it back
  merged = lora_lib.adapted_denses(lora_lib.merge(graphdef, state.lora, args["frozen"]))
  for d in merged.values():
    assert any(np.array_equal(np.asarray(d.lora_a[...]), a) for a in a_init.values())
  assert any(not np.array_equal(x, y) for x, y in zip(tiny.leaves(state.lora),
                                                      tiny.leaves(lora)))


def _products(graphdef, lora, frozen):
  """{target: B A-product delta W = A @ B} of a LoRA (stacked over layers)."""
  model = lora_lib.merge(graphdef, lora, frozen)
  return {p: np.einsum("lir,lro->lio", np.asarray(d.lora_a[...]), np.asarray(d.lora_b[...]))
          for p, d in lora_lib.adapted_denses(model).items()}


def _client_locals(graphdef, spec, lora, frozen, args, k):
  data = {key: np.asarray(v) for key, v in args["data"].items()}
  out = []
  for c in range(k):
    delta, _ = client_lib.local_train(graphdef, spec, optax.sgd(0.5), lora, frozen,
                                      {key: v[c] for key, v in data.items()},
                                      np.asarray(args["idx"])[c], np.asarray(args["valid"])[c],
                                      jax.random.key(0))
    out.append(jax.tree.map(jnp.add, lora, delta))
  return out


def test_non_private_ffa_round_is_the_exact_average_of_client_products():
  k = 3
  step, state, args, (graphdef, lora, frozen, spec) = tiny.round_setup(
      num_clients=k, mechanism="none", freeze_a=True, lr=0.5, steps=2)
  out, _ = step(state, **args)
  got = _products(graphdef, out.lora, frozen)
  locals_ = [_products(graphdef, l, frozen) for l in _client_locals(graphdef, spec, lora, frozen,
                                                                   args, k)]
  for p in got:
    np.testing.assert_allclose(got[p], np.mean([l[p] for l in locals_], axis=0), atol=1e-6)


def test_fedavg_of_both_factors_is_not_the_average_of_products():
  """The contrast that motivates FFA: mean(A) mean(B) != mean(A B) once both factors train."""
  k = 3
  step, state, args, (graphdef, lora, frozen, spec) = tiny.round_setup(
      num_clients=k, mechanism="none", lr=0.5, steps=2)
  out, _ = step(state, **args)
  got = _products(graphdef, out.lora, frozen)
  locals_ = [_products(graphdef, l, frozen) for l in _client_locals(graphdef, spec, lora, frozen,
                                                                   args, k)]
  gap = max(np.abs(got[p] - np.mean([l[p] for l in locals_], axis=0)).max() for p in got)
  assert gap > 1e-5


def test_ffa_upload_is_half_of_fedavg_and_a_is_sent_once(tmp_path):
  def run(agg):
    c = tiny_config.get_config(f"agg={agg},rounds=2,dp_seed=0,mode=none")
    with c.unlocked():
      c.lora.targets = ("q", "o")  # square targets: |A| = |B|
    return train.run(config_lib.from_config_dict(c), str(tmp_path / agg), progress=False).summary

  fedavg, ffa = run("fedavg"), run("ffa")
  assert ffa["bytes_up_total"] * 2 == fedavg["bytes_up_total"]
  assert ffa["a_frozen"] and not fedavg["a_frozen"]
  assert ffa["bytes_setup_down"] == ffa["lora_bytes"] * ffa["clients"]  # A once to every client
  assert fedavg["bytes_setup_down"] == 0
  assert ffa["bytes_down_total"] == ffa["bytes_setup_down"] + ffa["bytes_up_total"]
