"""A real Flower deployment on 127.0.0.1: SuperLink + 3 SuperNodes (+1 intruder), TLS with test
certificates, SuperNode authentication; the ServerApp is killed after round 1, the rerun resumes,
and the final LoRA equals the one-program simulation. Every process is stopped at the end
(LocalFederation).

A node that crashes and rejoins is tested in-process (tests/deploy/test_inprocess.py): in real
processes a dead node costs the server a whole round timeout, and under SuperNode authentication
the restarted node can reactivate its (key-bound) node id only after the SuperLink's heartbeat
timeout, about a minute."""

import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from dplora_jax import export
from dplora_jax import lora as lora_lib
from dplora_jax.deploy import local
from dplora_jax.deploy.client_state import ClientState
from tests.deploy.conftest import SEED, SPEC

pytestmark = pytest.mark.slow


def test_flower_deployment_with_tls_auth_crash_and_resume_equals_the_simulation(deploy_sim):
  cfg, sim, paths, root = deploy_sim
  root = root / "flower"
  tls = local.make_certificates(str(root / "certs"))
  workdir = root / "server"
  run_config = {"config": os.path.abspath(SPEC.split(":")[0]) + ":" + SPEC.split(":")[1],
                "overrides": f"dp.reproducible_seed={SEED}", "workdir": str(workdir),
                "round-timeout": 300.0, "wait-for-clients": 60.0,
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

    def kill_after_round_1(line):
      m = re.search(r"coordinator on .* \(pid (\d+)\)", line)
      if m:
        killed["pid"] = int(m.group(1))
      if "round 1/2:" in line:  # checkpointed: kill the ServerApp mid-run
        os.kill(killed["pid"], signal.SIGKILL)
        return True
      return False

    rc, out = fed.run(run_config, timeout=600, on_line=kill_after_round_1)
    assert rc == -1 and "pid" in killed, out[-3000:]
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
  model, *_ = export.load_trained(str(workdir))
  _, lora, _ = lora_lib.split(model)
  for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(sim.lora)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  # each client's own ledger: both rounds, the plan's eps, nothing charged twice
  for k in range(3):
    state = ClientState(str(root / f"state{k}"))
    (run,) = state.runs.values()
    assert sorted(run["rounds"]) == ["0", "1"]
    assert state.entry().epsilon == pytest.approx(sim.summary["epsilon"], rel=1e-9)
  assert os.path.exists(workdir / "adapter" / "adapter_model.safetensors")
