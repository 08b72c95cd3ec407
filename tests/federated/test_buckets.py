"""Sequence-length buckets: the same sampled examples give the same round, the padding only
differs, and every bucket is compiled once, ahead of time, into the one round program."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from dplora_jax.data import buckets as buckets_lib
from dplora_jax.federated import round as round_lib
from tests import tiny

K, N, BMAX, MB, STEPS = 4, 10, 6, 2, 2
BUCKETS = (4, 8, 12)  # tiny.T = 12


def test_bucket_lengths():
  assert buckets_lib.bucket_lengths(72, 3) == (24, 48, 72)
  assert buckets_lib.bucket_lengths(80, 4) == (24, 40, 64, 80)
  assert buckets_lib.bucket_lengths(72, 1) == (72,)
  assert buckets_lib.bucket_lengths(10, 5) == (8, 10)  # multiples of 8 merge


def _sample(seed=0):
  rng = np.random.default_rng(seed)
  idx = np.zeros((K, STEPS, BMAX), np.int32)
  valid = np.zeros((K, STEPS, BMAX), bool)
  for k in range(K):
    for s in range(STEPS):
      chosen = np.flatnonzero(rng.random(N) < 0.45)[:BMAX]
      idx[k, s, :len(chosen)] = chosen
      valid[k, s, :len(chosen)] = True
  return idx, valid


def test_ordering_keeps_the_sample_and_buckets_hold_every_row():
  data = tiny.client_data(K, N)
  lengths = [data["mask"][k].sum(1) for k in range(K)]
  idx, valid = _sample()
  o_idx, o_valid = buckets_lib.order_by_length(idx, valid, lengths)
  np.testing.assert_array_equal(o_valid, valid)
  for k in range(K):
    for s in range(STEPS):
      assert sorted(o_idx[k, s, valid[k, s]]) == sorted(idx[k, s, valid[k, s]])
      n = lengths[k][o_idx[k, s, valid[k, s]]]
      assert list(n) == sorted(n, reverse=True)
  b = buckets_lib.microbatch_buckets(o_idx, o_valid, lengths, BUCKETS, MB)
  assert b.shape == (K, STEPS, BMAX // MB)
  for k in range(K):
    for s in range(STEPS):
      for m in range(BMAX // MB):
        rows = slice(m * MB, (m + 1) * MB)
        need = lengths[k][o_idx[k, s, rows]][o_valid[k, s, rows]]
        length = BUCKETS[b[k, s, m]]
        assert (need <= length).all()  # every real token of the microbatch is kept
        if len(need) and b[k, s, m] > 0:
          assert need.max() > BUCKETS[b[k, s, m] - 1]  # and the bucket is the shortest


@pytest.mark.slow
def test_bucketed_round_equals_the_unbucketed_round_and_never_recompiles():
  graphdef, lora, frozen = tiny.model_and_lora()
  data = tiny.client_data(K, N)
  # a spread of lengths, so that several buckets are used
  lengths = np.random.default_rng(1).integers(3, 13, (K, N))
  data["mask"] = np.arange(tiny.T)[None, None] < lengths[..., None]
  data["loss_mask"] &= data["mask"]
  data["loss_mask"] &= np.arange(tiny.T)[None, None] < (lengths - 1)[..., None]
  base = tiny.client_spec("sample", clip=0.1, sigma=1.0, divisor=3, microbatch=MB, steps=STEPS)
  mesh = round_lib.make_mesh(1)
  server_tx = round_lib.make_server_optimizer("fedavg", 1.0)
  frozen_r = round_lib.replicate(mesh, frozen)
  data_s = round_lib.shard_clients(mesh, data)
  ids = round_lib.shard_clients(mesh, np.arange(K, dtype=np.int32))
  w = round_lib.shard_clients(mesh, np.ones(K, np.float32))
  key = jax.random.key(3)
  per_client = [lengths[k] for k in range(K)]

  def run(spec, rounds, bucketed, aot):
    step = round_lib.make_round_step(graphdef, spec, optax.sgd(0.5), server_tx, mesh)
    state = round_lib.replicate(mesh, round_lib.init_state(lora, server_tx))
    compiles, used = [], set()

    def listen(event, secs, **kw):
      if event == "/jax/core/compile/backend_compile_duration":
        compiles.append(event)

    for r in range(rounds):
      idx, valid = _sample(r)
      idx, valid = buckets_lib.order_by_length(idx, valid, per_client)
      b = buckets_lib.microbatch_buckets(idx, valid, per_client, spec.length_buckets or (12,),
                                         MB)
      used |= set(np.unique(b[valid.reshape(K, STEPS, -1, MB).any(-1)]))
      args = [round_lib.shard_clients(mesh, a) for a in (idx, valid)]
      fn = step
      if aot and r == 0:
        fn = step.lower(state, frozen_r, data_s, *args, w, ids, key,
                        round_lib.shard_clients(mesh, b)).compile()
        compiled = fn
        jax.monitoring.register_event_duration_secs_listener(listen)
      elif aot:
        fn = compiled
      state, _ = fn(state, frozen_r, data_s, *args, w, ids, key,
                    round_lib.shard_clients(mesh, b) if bucketed else None)
    if aot:
      jax.monitoring.unregister_event_duration_listener(listen)
    return tiny.leaves(state.lora), compiles, used

  bucketed = dataclasses.replace(base, length_buckets=BUCKETS, client_loop="map")
  got, compiles, used = run(bucketed, 3, True, True)
  assert used == {0, 1, 2}  # every bucket ran
  assert compiles == []  # compiled once, ahead of time: no round compiled anything
  for other in (dataclasses.replace(base, client_loop="map"),  # full length, clients mapped
                dataclasses.replace(base, client_loop="vmap")):  # full length, clients batched
    want, _, _ = run(other, 3, False, False)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, atol=2e-6)
