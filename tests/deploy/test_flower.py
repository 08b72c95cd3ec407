"""A real Flower deployment on 127.0.0.1: SuperLink + 3 SuperNodes (+1 intruder), TLS with test
certificates, SuperNode authentication. In round 1 SuperNode 2 is killed while its ClientApp
trains; the SuperLink declares it unavailable after its heartbeat lapses (Flower 1.42: within
2 x 30 s), the round completes with the fixed divisor; then the ServerApp is killed, node 2
restarts, the rerun resumes from the checkpoint and node 2 trains round 2. The final LoRA equals
the in-process deployment with the same drop (`deploy_drop`; that one equals the simulation when
nothing drops, test_inprocess.py), and the ledgers say who trained when. Every process is stopped
at the end (LocalFederation)."""

import json
import os
import re
import signal
import threading
import time

import jax
import numpy as np
import pytest

from dplora_jax import export
from dplora_jax import lora as lora_lib
from dplora_jax.deploy import local
from dplora_jax.deploy.client_state import ClientState
from tests.deploy.conftest import SEED, SPEC

pytestmark = pytest.mark.slow


def test_flower_deployment_with_tls_auth_node_and_server_crashes(deploy_sim, deploy_drop):
  cfg, sim, paths, root = deploy_sim
  _, reference, _ = deploy_drop
  root = root / "flower"
  tls = local.make_certificates(str(root / "certs"))
  workdir = root / "server"
  run_config = {"config": os.path.abspath(SPEC.split(":")[0]) + ":" + SPEC.split(":")[1],
                "overrides": f"dp.reproducible_seed={SEED}", "workdir": str(workdir),
                "round-timeout": 300.0, "wait-for-clients": 150.0,
                "evaluate": False}  # evaluation is tested in-process
  logs = []
  with local.LocalFederation(str(root / "fed"), tls=tls, auth=True, log=logs.append) as fed:
    fed.start_superlink()
    keys = [local.make_node_key(str(root / f"node{k}_key")) for k in range(4)]
    for k in range(3):  # the intruder's key (node 3) is never registered
      fed.register(keys[k] + ".pub")

    def node(k):
      return {"partition-id": k % 3, "data-path": paths[k % 3], "max-epsilon": 100.0,
              "state-dir": str(root / f"state{k}"), "allow-reproducible-seed": True}

    for k in range(4):
      fed.start_node(k, node(k), private_key=keys[k])

    killed = {}

    def kill_node_2_while_it_trains():
      # its ClientApp process starts for the train message (the second one after the hello)
      deadline = time.time() + 120
      while time.time() < deadline:
        if fed.log_text("supernode_2").count("Start `flwr-clientapp` process") >= 2:
          time.sleep(1.0)
          fed.stop_node(2)
          killed["node"] = time.time()
          return
        time.sleep(0.2)

    def on_line(line):
      m = re.search(r"coordinator on .* \(pid (\d+)\)", line)
      if m:
        killed["pid"] = int(m.group(1))
      if "3 of 3 clients joined" in line:
        threading.Thread(target=kill_node_2_while_it_trains, daemon=True).start()
      if "round 1/2:" in line:  # checkpointed: kill the ServerApp mid-run, restart node 2
        killed["round_1"] = line
        os.kill(killed["pid"], signal.SIGKILL)
        fed.start_node(2, node(2), private_key=keys[2])
        return True
      return False

    rc, out = fed.run(run_config, timeout=600, on_line=on_line)
    assert rc == -1 and "pid" in killed and "node" in killed, out[-3000:]
    assert "2 of 3 sampled clients contributed" in killed["round_1"], out[-3000:]
    assert "no reply from client(s) [2]" in out
    rc, out = fed.run(run_config, timeout=600)
    assert rc == 0, out[-3000:]
    assert "resuming run" in out and "after round 1" in out
    assert "3 of 3 clients joined: [0, 1, 2]" in out
    assert "No SuperNode found with the given public key" in fed.log_text("superlink")
    assert "SuperNode ID" not in fed.log_text("supernode_3")  # the intruder never got in
    for k in range(3):
      assert "SuperNode ID" in fed.log_text(f"supernode_{k}")
  # every process is gone
  assert fed.superlink is None and not fed.nodes

  summary = json.load(open(workdir / "summary.json"))
  assert summary["resumed_from_round"] == 1 and summary["deployment"]["rounds_done"] == 2
  assert summary["epsilon"] == pytest.approx(sim.summary["epsilon"], rel=1e-12)
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [(l["participants"], l["sampled"], l["dropped"]) for l in lines] == [(2, 3, 1), (3, 3, 0)]
  model, *_ = export.load_trained(str(workdir))
  _, lora, _ = lora_lib.split(model)
  for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(reference.state.lora)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  # each client's own ledger: the rounds it trained, their eps, nothing charged twice
  mech = sim.setup.plan.get("example")
  for k in range(3):
    state = ClientState(str(root / f"state{k}"))
    (run,) = state.runs.values()
    assert sorted(run["rounds"]) == (["1"] if k == 2 else ["0", "1"])
    want = mech.epsilon_after(1) if k == 2 else sim.summary["epsilon"]
    assert state.entry().epsilon == pytest.approx(want, rel=1e-9)
  assert os.path.exists(workdir / "adapter" / "adapter_model.safetensors")
