"""One simulation run shared by the deployment tests (the reference a deployment must equal)."""

import pytest

from dplora_jax import config_files, train
from dplora_jax.deploy import data as data_lib

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
