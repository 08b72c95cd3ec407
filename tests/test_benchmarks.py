"""The step profiler's bookkeeping (benchmarks/profile_step.py): self times, HLO lookup, FLOPs."""

import jax
import jax.numpy as jnp

from benchmarks import profile_step


def test_self_time_subtracts_nested_events_per_thread():
  ev = [{"ph": "X", "name": "outer", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 1, "dur": 3, "pid": 1, "tid": 1},
        {"ph": "X", "name": "b", "ts": 5, "dur": 4, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 2, "dur": 7, "pid": 1, "tid": 2}]  # another thread
  times, calls = profile_step.self_times(ev)
  assert times == {"outer": 3, "a": 10, "b": 4} and calls == {"outer": 1, "a": 2, "b": 1}


def test_a_traced_matmul_is_found_in_the_hlo_with_its_flops():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(axis=0))
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  compiled = f.lower(a, b).compile()
  hlo = profile_step.parse_hlo(compiled.as_text())
  times, calls, wall = profile_step.profile(compiled, (a, b))
  traced = {n: hlo[n] for n in times if n in hlo}
  matmuls = [n for n, i in traced.items() if profile_step.category(i) == "matmul"]
  assert matmuls and wall > 0
  assert sum(profile_step.dot_flops(hlo[n], hlo) for n in matmuls) == 2 * 64 * 32 * 48
