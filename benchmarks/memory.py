"""Peak memory of this process: host resident set and the first device's allocator peak."""

from __future__ import annotations

import resource

import jax


def peak_rss_mib() -> float:
  """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib() -> float | None:
  """The first device's peak bytes in use, in MiB; None where the backend keeps no such count
  (XLA:CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20
