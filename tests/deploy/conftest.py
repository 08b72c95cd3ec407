"""Shared by the deployment tests: one simulation run (the reference a deployment must equal), an
in-memory transport for the server and clients in one process, and one deployment with a dropped
node (the reference of the real-process run with a killed SuperNode)."""

import pytest

from dplora_jax import config_files, train
from dplora_jax.deploy import client as client_lib, protocol
from dplora_jax.deploy import data as data_lib
from dplora_jax.deploy import server as server_lib

SPEC = "configs/tiny.py:clients=3,rounds=2"
SEED = 7


@pytest.fixture(scope="session")
def deploy_sim(tmp_path_factory):
  """(cfg, simulation RunResult, per-client data files, a scratch root) of SPEC at SEED."""
  root = tmp_path_factory.mktemp("deploy")
  cfg = config_files.load_with_overrides(SPEC, {"dp.reproducible_seed": str(SEED)})
  sim = train.run(cfg, str(root / "sim"), progress=False)
  paths = data_lib.write_client_files(cfg, str(root / "data"))
  return cfg, sim, paths, root


class Transport:
  """In-memory transport: node id -> InstitutionClient; records every message; `drop(r, c)`
  loses client c's train message of round r; `crash_at` raises before sending that round."""

  def __init__(self, clients: dict[int, client_lib.InstitutionClient]):
    self.clients = dict(clients)
    self.sent, self.replies = [], []
    self.drops, self.crash_at, self.rejoin = set(), None, {}

  def node_ids(self):
    return sorted(self.clients)

  def send(self, kind, messages, timeout):
    out = {}
    for node, msg in messages.items():
      rnd = msg["config"].get("round")
      if kind == protocol.TRAIN and rnd == self.crash_at:
        raise KeyboardInterrupt("server killed")
      self.sent.append((kind, node, msg))
      cid = self.clients[node].node.client_id
      if kind == protocol.TRAIN and (rnd, cid) in self.drops:
        out[node] = None
        if cid in self.rejoin:  # the node restarts: a new node id from now on
          self.clients[self.rejoin.pop(cid)] = self.clients.pop(node)
        continue
      out[node] = self.clients[node].handle(kind, msg)
      self.replies.append((kind, cid, out[node]))
    return out


@pytest.fixture
def fed(deploy_sim):
  return deploy_sim


def make_clients(paths, root, name, max_epsilon=100.0):
  return {100 + k: client_lib.InstitutionClient(client_lib.NodeSettings(
      k, p, str(root / f"{name}_state{k}"), max_epsilon, allow_reproducible_seed=True))
      for k, p in enumerate(paths)}


def serve(cfg, transport, workdir, evaluate=False):
  return server_lib.serve(cfg, transport, server_lib.ServerSettings(
      str(workdir), wait_for_clients=0, evaluate=evaluate), log=lambda m: None)


@pytest.fixture(scope="session")
def deploy_drop(deploy_sim):
  """The in-process deployment of SPEC in which client 2's node dies in round 1 (its reply never
  comes) and rejoins with a new node id: (transport, ServeResult, server workdir). The reference
  for the real-process run in which a SuperNode is killed (test_flower.py)."""
  cfg, _, paths, root = deploy_sim
  t = Transport(make_clients(paths, root, "drop"))
  t.drops, t.rejoin = {(0, 2)}, {2: 999}
  res = serve(cfg, t, root / "drop_server")
  return t, res, root / "drop_server"
