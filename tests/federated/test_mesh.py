"""The round on a 2-D (clients, fsdp) mesh: frozen weights split over fsdp, the same numbers as
the 1-D round, including ragged samples (clients running different microbatch counts, the case
where collectives of the fsdp axis inside the loop would leave devices waiting on each other)."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from dplora_jax import config as config_lib
from dplora_jax.federated import round as round_lib
from tests import tiny

K, N, STEPS, BMAX = 4, 6, 2, 6


def _round(num_devices, fsdp, ordered=False, k=K):
  graphdef, lora, frozen = tiny.model_and_lora()
  spec = tiny.client_spec("sample", clip=0.1, sigma=1.0, divisor=3, microbatch=2, steps=STEPS)
  if fsdp > 1:
    # as `round.run_round_step` does on a 2-D mesh: uniform loops, examples spread over fsdp
    spec = dataclasses.replace(spec, uniform_axis=round_lib.AXIS, example_axis=round_lib.FSDP)
  mesh = round_lib.make_mesh(num_devices, fsdp)
  server_tx = round_lib.make_server_optimizer("fedavg", 1.0)
  step = round_lib.make_round_step(graphdef, spec, optax.sgd(0.5), server_tx, mesh,
                                   ordered=ordered)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, N, (k, STEPS, BMAX)).astype(np.int32)
  valid = np.zeros((k, STEPS, BMAX), bool)
  for c in range(k):  # client c samples c % 4 + 1 rows: 1, 1, 2, 2 microbatches of 2
    valid[c, :, :c % 4 + 1] = True
  placed = jax.device_put(frozen, round_lib.frozen_shardings(mesh, frozen))
  args = dict(frozen=placed, data=round_lib.shard_clients(mesh, tiny.client_data(k, N)),
              idx=round_lib.shard_clients(mesh, idx), valid=round_lib.shard_clients(mesh, valid),
              weights=round_lib.shard_clients(mesh, np.ones(k, np.float32)),
              client_ids=round_lib.shard_clients(mesh, np.arange(k, dtype=np.int32)),
              noise_key=jax.random.key(42))
  state = round_lib.replicate(mesh, round_lib.init_state(lora, server_tx))
  out, _ = step(state, **args)
  device = mesh.devices.flat[0]
  frozen_bytes = sum(s.data.nbytes for x in jax.tree.leaves(placed)
                     for s in x.addressable_shards if s.device == device)
  return [np.asarray(x) for x in jax.tree.leaves(out.lora)], frozen_bytes


def test_clients_by_fsdp_mesh_equals_the_one_axis_round_and_splits_the_frozen_weights():
  assert jax.device_count() >= 8
  flat, flat_bytes = _round(4, 1)
  grid, grid_bytes = _round(8, 2)
  for a, b in zip(flat, grid):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  weights = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(tiny.model_and_lora()[2]))
  assert flat_bytes == weights
  norms = 4 * (2 * 2 * 16 + 16)  # per-layer norm scales and the final norm stay whole
  assert grid_bytes == (weights - norms) / 2 + norms


def test_fsdp_must_divide_the_devices():
  with pytest.raises(ValueError, match="mesh.fsdp=3"):
    round_lib.make_mesh(8, 3)
  with pytest.raises(ValueError, match="mesh.fsdp"):
    config_lib.MeshConfig(fsdp=0)


def test_ordered_aggregation_is_bitwise_independent_of_the_device_count():
  one, _ = _round(1, 1, ordered=True, k=8)
  eight, _ = _round(8, 1, ordered=True, k=8)
  for a, b in zip(one, eight):
    np.testing.assert_array_equal(a, b)


def test_clipped_rows_sum_to_the_clipped_sum():
  from dplora_jax.dp.mechanisms import ClientDP
  rng = np.random.default_rng(1)
  deltas = {"a": rng.normal(size=(5, 3, 2)).astype(np.float32),
            "b": rng.normal(size=(5, 4)).astype(np.float32)}
  take = np.array([True, True, False, True, True])
  dp = ClientDP(sum_noise=1.0, expected_clients=4.0)
  total, _, norms = dp.clip(deltas, take, 1.5)
  rows, _, norms2 = dp.clip_rows(deltas, take, 1.5)
  np.testing.assert_array_equal(norms, norms2)
  for name in deltas:
    np.testing.assert_allclose(np.asarray(rows[name]).sum(0), total[name], atol=1e-6)
    assert not np.asarray(rows[name])[2].any()  # not taking part: exactly zero
