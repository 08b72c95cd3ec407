"""One run over many processes (hosts): JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program on its own devices; the round is one SPMD program over the
global `clients` mesh, so its collectives (the psum of client updates) span hosts. What this
module adds to JAX's runtime is what a DP run needs to stay one run:

- `initialize`: starts the runtime from arguments, the environment this project's launchers set
  (`DPLORA_COORDINATOR`, `DPLORA_NUM_PROCESSES`, `DPLORA_PROCESS_ID`, `DPLORA_LOCAL_DEVICES`), or
  the cluster's own (TPU pod, SLURM, Open MPI: `auto`).
- `share_root`: the run's secret DP randomness root is drawn once, on process 0, and broadcast.
  Drawn in every process from its own OS entropy (the default), the processes would sample and
  noise from different roots: the "replicated" state diverges without an error. The root
  crosses only the run's own hosts (JAX's collectives, inside the trusted training party).
- `assert_replicated`: a cross-process check that a replicated value (the root, the global LoRA)
  is bitwise identical in every process; a mismatch names what and where (e.g. the round).
- `place`: host arrays onto a global sharding without materialising or comparing the whole value
  across processes (`jax.make_array_from_callback`: each process reads only the slices its own
  devices hold; `jax.device_put` of a host array to a cross-process sharding all-gathers it).
- `owned_rows`: the rows of a leading-axis-sharded array this process holds, so each process
  builds only its own clients' arrays.
- CPU runs: XLA:CPU sizes a process's intra-op thread pool max(PJRT_NPROC or its cores, its
  devices), and the pool size decides how some reductions are split into tasks, so the same
  program on the same inputs can differ by an ulp between a process with 8 devices and one with 4.
  `initialize` gives every CPU process the pool a one-process run of all the devices would have
  (PJRT_NPROC = max(cores, devices of the run)), so with `mesh.ordered_aggregation` results are
  bitwise independent of the process layout.

Single-process runs never touch the runtime: every function here is the identity there.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

ENV_COORDINATOR = "DPLORA_COORDINATOR"
ENV_NUM_PROCESSES = "DPLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "DPLORA_PROCESS_ID"
ENV_LOCAL_DEVICES = "DPLORA_LOCAL_DEVICES"
ENV_PJRT_NPROC = "PJRT_NPROC"  # XLA:CPU's intra-op thread pool size (before the local devices)
# Fault injection for the tests only: each process keeps its own root (the bug `share_root`
# prevents), so that the check is seen to fire. Never set it in a real run.
ENV_UNSAFE_UNSHARED = "DPLORA_UNSAFE_UNSHARED_RANDOMNESS"


class ReplicaMismatch(RuntimeError):
  """Processes of one run hold different values of something that must be replicated."""


def settings_from_env(environ=None) -> dict | None:
  """The runtime settings in the environment (None: a single-process run).

  Raises:
    ValueError: an incomplete or malformed set, naming the variable.
  """
  env = os.environ if environ is None else environ
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  given = [n for n in names if env.get(n)]
  if not given:
    return None
  if len(given) != len(names):
    missing = [n for n in names if n not in given]
    raise ValueError(f"multi-process run: {', '.join(missing)} not set (with {given[0]} set, "
                     f"all of {', '.join(names)} are needed).")
  out = {"coordinator": env[ENV_COORDINATOR]}
  for key, name in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID),
                    ("local_devices", ENV_LOCAL_DEVICES)):
    if env.get(name):
      try:
        out[key] = int(env[name])
      except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer.") from None
  if not 0 <= out["process_id"] < out["num_processes"]:
    raise ValueError(f"{ENV_PROCESS_ID}={out['process_id']} is outside 0..{ENV_NUM_PROCESSES}-1 "
                     f"({out['num_processes']}).")
  return out


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_devices: int | None = None,
               auto: bool = False):
  """Starts JAX's distributed runtime; call before anything else uses JAX.

  Args:
    coordinator, num_processes, process_id: as `jax.distributed.initialize` (process 0 serves
      the coordinator at HOST:PORT).
    local_devices: CPU devices of this process (`jax_num_cpu_devices`; CPU runs and tests only).
      Also sets PJRT_NPROC (unless set) to `cpu_pool_size` of the run's devices, the same in
      every process (see the module docstring).
    auto: let JAX detect the cluster (TPU pod, SLURM, Open MPI) instead.
  """
  if local_devices:
    jax.config.update("jax_num_cpu_devices", int(local_devices))
    os.environ.setdefault(ENV_PJRT_NPROC, str(cpu_pool_size(int(local_devices) *
                                                            int(num_processes or 1))))
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))


def cpu_pool_size(run_devices: int) -> int:
  """The intra-op thread pool of a one-process CPU run of `run_devices` devices on this host:
  max(schedulable cores, devices) (XLA's PjRt CPU client)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(int(cores or 1), int(run_devices))


def initialize_from_env(environ=None) -> bool:
  """`initialize` from `settings_from_env`; False (nothing done) without those variables."""
  settings = settings_from_env(environ)
  if settings is None:
    return False
  initialize(**settings)
  return True


def multi_process() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0: the one that writes metrics, TensorBoard, the summary and the lock."""
  return jax.process_index() == 0


def share_root(root: int) -> int:
  """Process 0's 256-bit randomness root, in every process."""
  if not multi_process() or os.environ.get(ENV_UNSAFE_UNSHARED):
    return root
  words = np.array([(root >> (32 * i)) & 0xFFFFFFFF for i in range(8)], np.uint32)
  words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return sum(int(w) << (32 * i) for i, w in enumerate(words))


def digest(tree) -> bytes:
  """SHA-256 of a pytree's local values (dtype, shape and bytes of every leaf, in order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.digest()


def assert_replicated(tree, what: str):
  """Raises ReplicaMismatch unless every process holds bitwise the same `tree`.

  `what` names the value and the moment (e.g. "the global LoRA after round 3").
  """
  if not multi_process():
    return
  mine = np.frombuffer(digest(tree), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))
  differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ReplicaMismatch(f"{what} differs between processes: process(es) {differ} disagree with "
                          f"process 0 (of {every.shape[0]}). The processes no longer run one "
                          "run; stopping.")


def place(sharding, tree):
  """Host arrays as global arrays of `sharding` (one NamedSharding, or a tree of them matching
  `tree`); in a multi-process run each process reads only the slices its devices hold."""
  if not multi_process():
    return jax.device_put(tree, sharding)
  shardings = (jax.tree.map(lambda _: sharding, tree) if isinstance(sharding, NamedSharding)
               else sharding)

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def owned_rows(sharding: NamedSharding, num_rows: int) -> list[int]:
  """The leading-axis rows of a [num_rows, ...] array of `sharding` that this process's devices
  hold (all rows in a single-process run)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((num_rows,)).values():
    rows.update(range(num_rows)[index[0]])
  return sorted(rows)
