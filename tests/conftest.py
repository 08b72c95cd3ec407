"""Test set-up: 8 fake CPU devices before JAX starts, float32 matmuls at full precision, and one
XLA compilation cache for the whole run (workers and the processes tests start share it)."""

import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# LLVM -O1 for XLA:CPU's generated code: most tests run tiny programs once, so compiling is most
# of their time (a tiny round's set-up and compile: ~33 s at the default level, ~18 s at 1, this
# machine), while SmolLM2's step is its library matmuls (4.2 s at both levels). Execution only:
# the programs and their semantics are the same; the processes tests start inherit the flag.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The first process of a run (pytest itself, or the xdist controller) makes the cache directory;
# xdist workers and every process a test starts inherit it through the environment, so a program
# (a tiny round, a SmolLM2 step) compiles once per run instead of once per process. Executables
# are keyed by their HLO, compile options and devices: a hit runs the same code as a compile.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dplora_xla_")
  # a size limit turns on JAX's file lock, so a process never reads an entry another is writing
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into node ids
def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist's `--dist loadgroup` (make test), each test file runs on one worker (its
  module fixtures are built once) and the deployment files share one (the simulation fixture)."""
  for item in items:
    path = item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group("deploy" if path.startswith("tests/deploy/")
                                            else path))


def pytest_configure(config):
  """xdist 3.8's loadgroup writes the group into `item._nodeid`, which pytest 9 no longer reads:
  the grouping is silently off and every module fixture is built on both workers (the audit's
  twice: +6 min). setup.cfg pins pytest < 9; refuse a run that would not group."""
  if getattr(config.option, "dist", "no") == "loadgroup":
    import xdist
    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if version(pytest.__version__) >= (9, 0) and version(xdist.__version__) <= (3, 8):
      raise pytest.UsageError(
          f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__}: --dist loadgroup "
          "does not group; install the test extra's pins (pip install -e .[test])")
