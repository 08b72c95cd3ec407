"""Test set-up: 8 fake CPU devices before JAX starts, float32 matmuls at full precision."""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist's `--dist loadgroup` (make test), each test file runs on one worker (its
  module fixtures are built once) and the deployment files share one (the simulation fixture)."""
  for item in items:
    path = item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group("deploy" if path.startswith("tests/deploy/")
                                            else path))
