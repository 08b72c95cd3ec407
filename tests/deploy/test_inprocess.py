"""The deployment's server and clients in one process (an in-memory transport): equal to the
simulation through a server crash and resume, the fixed divisor, budgets, guards, what travels.

The same code runs behind Flower in tests/deploy/test_flower.py (real processes)."""

import dataclasses
import json
import os

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import rdp

from dplora_jax.deploy import client as client_lib, protocol
from dplora_jax.dp import accounting
from dplora_jax.dp.randomness import DPRandomness

from tests.deploy.conftest import SEED, Transport, make_clients as _clients, serve as _serve


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_close(a, b, atol=1e-6):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_deployment_equals_the_simulation_through_a_server_crash_and_sends_only_the_release(fed):
  cfg, sim, paths, root = fed
  clients = _clients(paths, root, "eq")
  t = Transport(clients)
  t.crash_at = 1  # the server is killed after round 1's checkpoint, while sending round 2
  with pytest.raises(KeyboardInterrupt):
    _serve(cfg, t, root / "eq_server")
  t.crash_at = None
  res = _serve(cfg, t, root / "eq_server", evaluate=True)  # the rerun resumes
  assert res.summary["resumed_from_round"] == 1
  assert [json.loads(l)["round"] for l in open(root / "eq_server" / "metrics.jsonl")] == [1, 2]
  _assert_close(res.state.lora, sim.lora)
  assert res.summary["eval"]["after"] == pytest.approx(sim.summary["eval"]["after"])
  # eps: server, every client's own ledger and the simulation all equal the accountant's value
  # computed here from first principles (q = B / N, the plan's sigma, rounds x local steps)
  mech = sim.setup.plan.get("example")
  acc = rdp.RdpAccountant(accounting.ORDER_PRESETS["default"])
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      cfg.data.batch_size / cfg.data.max_client_size,
      dp_accounting.GaussianDpEvent(mech.noise_multiplier)), cfg.fed.rounds * cfg.fed.local_steps)
  want = acc.get_epsilon(mech.accountant_delta)
  assert res.summary["epsilon"] == pytest.approx(want, rel=1e-9)
  assert sim.summary["epsilon"] == pytest.approx(want, rel=1e-9)
  for c in clients.values():
    assert c.state.entry().epsilon == pytest.approx(want, rel=1e-9)
    assert c.state.rounds_trained(res.summary["deployment"]["run_id"]) == cfg.fed.rounds
  # what reached the server: exactly the schema, the LoRA's own arrays, nothing secret
  names = set(protocol.lora_names(sim.lora))
  secrets = []
  run_id = res.summary["deployment"]["run_id"]
  for c in clients.values():
    for r in (c.state.randomness(run_id, SEED), c.state.randomness(run_id)):
      secrets.append(np.asarray(jax.random.key_data(r.noise_key)).tobytes())
    secrets.append(np.asarray(jax.random.key_data(DPRandomness.from_state(c.state.root).noise_key))
                   .tobytes())
  roots = [c.state.root["root"] for c in clients.values()]
  assert sum(k == protocol.TRAIN for k, *_ in t.replies) == 3 * cfg.fed.rounds
  for kind, cid, rep in t.replies:
    assert set(rep["config"]) == protocol.REPLY_KEYS[kind]
    assert set(rep["arrays"]) == (names if kind == protocol.TRAIN else set())
    text = json.dumps(rep["config"])
    assert not any(root_hex[2:] in text for root_hex in roots)
    payload = b"".join(a.tobytes() for a in rep["arrays"].values())
    assert not any(s in payload for s in secrets)
  # the state files are owner-only (they hold the root)
  for c in clients.values():
    assert os.stat(c.state.path).st_mode & 0o077 == 0


def test_a_dropped_client_is_a_non_contribution_and_rejoins(fed, deploy_drop):
  cfg, sim, paths, root = fed
  t, res, workdir = deploy_drop
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [(l["participants"], l["sampled"], l["dropped"]) for l in lines] == [(2, 3, 1), (3, 3, 0)]
  # round 1's global update = the two replies / 3 (the divisor fixed before anyone replied)
  before, after = [protocol.arrays_to_lora(m["arrays"], sim.lora) for k, n, m in t.sent
                   if k == protocol.TRAIN and n == 100]
  deltas = [protocol.arrays_to_lora(rep["arrays"], sim.lora) for k, cid, rep in t.replies
            if k == protocol.TRAIN and rep["config"]["round"] == 0]
  assert len(deltas) == 2
  want = jax.tree.map(lambda b, d0, d1: b + (d0 + d1) / 3.0, before, *deltas)
  _assert_close(after, want)
  # client 2 rejoined with its new node id and trained round 2 only; its ledger says so
  c2 = t.clients[999]
  run_id = res.summary["deployment"]["run_id"]
  assert c2.state.rounds_trained(run_id) == 1 and c2.state.trained(run_id, 0) is None
  mech = sim.setup.plan.get("example")
  assert c2.state.entry().epsilon == pytest.approx(mech.epsilon_after(1), rel=1e-9)
  assert c2.state.entry().epsilon < mech.epsilon


def test_clients_out_of_budget_refuse_and_the_server_stops(fed):
  cfg, sim, paths, root = fed
  one_round = sim.setup.plan.get("example").epsilon_after(1)
  clients = _clients(paths, root, "budget", max_epsilon=one_round * 1.001)
  t = Transport(clients)
  res = _serve(cfg, t, root / "budget_server")
  dep = res.summary["deployment"]
  assert dep["rounds_done"] == 1 and "out of privacy budget" in dep["stopped"]
  refusals = [rep["config"] for k, _, rep in t.replies if rep["config"]["status"] == "refused"]
  assert len(refusals) == 3 and all(r["reason"].startswith("privacy budget") for r in refusals)
  assert all(not rep["arrays"] for *_, rep in t.replies if rep["config"]["status"] == "refused")
  for c in clients.values():
    assert c.state.entry().epsilon == pytest.approx(one_round, rel=1e-9)


def test_client_guards(fed, tmp_path):
  cfg, sim, paths, root = fed
  node = client_lib.NodeSettings(0, paths[0], str(tmp_path / "s0"), 100.0,
                                 allow_reproducible_seed=True)
  c = client_lib.InstitutionClient(node)
  cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg)))
  fp = sim.setup.fingerprint
  lora = protocol.lora_to_arrays(sim.lora)

  def train(config=cfg_dict, fingerprint=fp, arrays=lora, round_=0, run="r"):
    msg = protocol.instruction(protocol.TRAIN, run_id=run, config=config,
                               model_fingerprint=fingerprint, round_=round_, lora=arrays)
    return c.handle(protocol.TRAIN, msg)

  first = train()
  assert first["config"]["status"] == "ok"
  again = train()  # the same round from the same model: the same release, charged once
  for n in first["arrays"]:
    np.testing.assert_array_equal(first["arrays"][n], again["arrays"][n])
  assert c.state.rounds_trained("r") == 1
  other = {n: a + 1.0 for n, a in lora.items()}  # the same round from another model: refused
  assert "already trained" in train(arrays=other)["config"]["reason"]
  assert "base model mismatch" in train(fingerprint="0" * 64)["config"]["reason"]
  for mode in ("none", "client"):
    d = json.loads(json.dumps(cfg_dict))
    d["dp"]["mode"] = mode
    assert "does not protect" in train(config=d, run=mode)["config"]["reason"]
  d = json.loads(json.dumps(cfg_dict))  # the same round and model under another config
  d["optim"]["learning_rate"] = 2 * d["optim"]["learning_rate"]
  assert "already trained" in train(config=d)["config"]["reason"]
  strict = client_lib.InstitutionClient(dataclasses.replace(node, allow_reproducible_seed=False,
                                                            state_dir=str(tmp_path / "s1")))
  msg = protocol.instruction(protocol.TRAIN, run_id="r", config=cfg_dict, model_fingerprint=fp,
                             lora=lora)
  assert "reproducible_seed" in strict.handle(protocol.TRAIN, msg)["config"]["reason"]
  d = json.loads(json.dumps(cfg_dict))
  d["data"]["max_client_size"] = 10  # this client holds more than the public bound
  reason = train(config=d, run="small")["config"]["reason"]
  assert "above the public bound" in reason and "134" not in reason  # its size stays private
  d = json.loads(json.dumps(cfg_dict))
  d["lora"]["init_from"] = "/some/adapter/on/this/node"
  assert "lora.init_from names a path" in train(config=d, run="p")["config"]["reason"]
  bad = tmp_path / "bad.jsonl"  # a record whose content must not reach the server
  bad.write_text('{"text": "ok", "label": 1}\n{"text": "secret text", "label": "bullish"}\n')
  c_bad = client_lib.InstitutionClient(dataclasses.replace(node, data_path=str(bad),
                                                           state_dir=str(tmp_path / "s2")))
  reason = c_bad.handle(protocol.TRAIN, protocol.instruction(
      protocol.TRAIN, run_id="b", config=cfg_dict, model_fingerprint=fp, lora=lora))["config"]
  assert "cannot build the run" in reason["reason"] and "bullish" not in json.dumps(reason)
  with pytest.raises(ValueError, match="max-epsilon"):
    client_lib.NodeSettings.from_node_config({"partition-id": 0, "data-path": "x",
                                              "state-dir": "y"})
  with pytest.raises(ValueError, match="trust-server"):
    client_lib.NodeSettings.from_node_config({"partition-id": 0, "data-path": "x",
                                              "state-dir": "y", "max-epsilon": 1,
                                              "trust-server": "maybe"})


def test_no_two_runs_of_a_client_share_noise_or_samples(fed, tmp_path):
  """A client keeps one secret root for all runs; each run draws from its own child of it, so a
  server that starts a second run cannot get the same round's noise on another input."""
  cfg, sim, paths, root = fed
  node = client_lib.NodeSettings(0, paths[0], str(tmp_path / "s"), 100.0)
  c = client_lib.InstitutionClient(node)
  d = json.loads(json.dumps(dataclasses.asdict(cfg)))
  d["dp"]["reproducible_seed"] = -1
  lora = protocol.lora_to_arrays(sim.lora)
  replies = [c.handle(protocol.TRAIN, protocol.instruction(
      protocol.TRAIN, run_id=run, config=d, model_fingerprint=sim.setup.fingerprint,
      round_=0, lora=lora)) for run in ("run-a", "run-b")]
  assert all(r["config"]["status"] == "ok" for r in replies)
  for n in replies[0]["arrays"]:
    assert not np.allclose(replies[0]["arrays"][n], replies[1]["arrays"][n])
  a, b = c.state.randomness("run-a"), c.state.randomness("run-b")
  assert not np.array_equal(jax.random.key_data(a.noise_key), jax.random.key_data(b.noise_key))
  assert not np.array_equal(a.examples(0, 0).random(8), b.examples(0, 0).random(8))
  assert a.source == "os-entropy"
  # and the same run asks again: the identical release, charged once
  again = c.handle(protocol.TRAIN, protocol.instruction(
      protocol.TRAIN, run_id="run-a", config=d, model_fingerprint=sim.setup.fingerprint,
      round_=0, lora=lora))
  for n in again["arrays"]:
    np.testing.assert_array_equal(again["arrays"][n], replies[0]["arrays"][n])
  assert c.state.rounds_trained("run-a") == 1
