"""Test set-up: 8 fake CPU devices before JAX starts, float32 matmuls at full precision, and one
XLA compilation cache for the whole run (workers and the processes tests start share it)."""

import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
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
  groups = {}
  for item in items:
    path = item.nodeid.split("::")[0]
    groups[item] = "deploy" if path.startswith("tests/deploy/") else path
    item.add_marker(pytest.mark.xdist_group(groups[item]))
  # The slowest groups first (make test's durations on 2 cores, seconds), so that the two workers
  # finish together rather than one starting the audit last; the Makefile turns off xdist's own
  # reordering by test count (--no-loadscope-reorder). A stable sort: each group stays in order.
  rank = {g: i for i, g in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda it: rank.get(groups[it], len(rank)))


_SLOWEST_FIRST = ("tests/test_audit.py",  # ~420: two SmolLM2 audits in one fixture
                  "deploy",  # ~400: a Flower deployment with crashes, the in-process one
                  "tests/test_multiprocess.py",  # ~230: two-process runs
                  "tests/test_checkpoint.py",  # ~170: kills at every save phase
                  "tests/dp/test_guarantees.py", "tests/federated/test_ffa.py",
                  "tests/launch/test_sweep.py", "tests/test_memory_plan.py",
                  "tests/dp/test_central_noise.py", "tests/federated/test_client_dp.py")


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
