"""Per-device memory of a run's round, from shapes only: no weight is read, nothing runs.

The round (`federated.round.make_round_step`) is lowered and compiled ahead of time for the
config's mesh with `jax.ShapeDtypeStruct` arguments (the model built under `nnx.eval_shape`, its
architecture from the HF `config.json`), and XLA's `compiled.memory_analysis()` gives the bytes
one device needs: arguments (frozen weights of its fsdp slice, its clients' examples, the
replicated LoRA state), outputs, and temporaries (activations kept for the backward pass, the
per-example gradients of a microbatch). `fit` finds the largest microbatch within a device's
memory. The privacy plan (public values) fixes the physical batch, as in a real run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dplora_jax import build as build_lib, lora as lora_lib, tasks
from dplora_jax.config import RunConfig
from dplora_jax.federated import round as round_lib
from dplora_jax.models import (ModelConfig, build_model, configure_execution, from_hf_config,
                               load_tokenizer)
from dplora_jax.models.loading import resolve_path


@dataclasses.dataclass
class MemoryPlan:
  """Bytes per device of one compiled round (XLA's memory analysis) and its shape."""
  microbatch: int
  max_batch: int
  clients_per_device: int
  mesh: dict
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs that reuse (donated) argument buffers
  temp_bytes: int
  frozen_bytes: int  # of the arguments: this device's slice of the frozen base weights
  lora_dtype: str
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """Peak estimate: arguments + outputs not aliased to them + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def architecture(cfg: RunConfig) -> tuple[ModelConfig, object]:
  """(architecture, tokenizer) of the run's base model, reading only config.json and the
  tokenizer (`model.tokenizer`, else the model's own; never the weights)."""
  m = cfg.model
  if m.random_init:
    tok = load_tokenizer(m.tokenizer or m.path)
    arch = build_lib.random_arch(cfg, tok)[0]
  else:
    path = resolve_path(m.path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
      raise ValueError(f"model.path={m.path!r}: the planner reads an HF directory's config.json "
                       f"({cfg_file} not found).")
    with open(cfg_file) as f:
      arch = from_hf_config(json.load(f), cfg_file)
    tok = load_tokenizer(m.tokenizer or m.path)
  return arch.replace(dtype=m.dtype, param_dtype=m.param_dtype), tok


def abstract_parts(cfg: RunConfig, arch: ModelConfig):
  """(graphdef, lora, frozen) of the run's model with LoRA, as ShapeDtypeStructs."""
  m = cfg.model

  def make():
    model = configure_execution(build_model(arch, seed=cfg.seed), attention=m.attention,
                                remat=m.remat, remat_policy=m.remat_policy)
    lora_lib.add_lora(model, build_lib.effective_lora(cfg), jax.random.key(0))
    return model

  return lora_lib.split(nnx.eval_shape(make))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def plan_round(cfg: RunConfig, *, microbatch: int | None = None,
               clients_per_device: int | None = None, num_devices: int | None = None,
               parts=None) -> MemoryPlan:
  """Compiles the round of `cfg` from shapes and returns its per-device memory.

  Args:
    microbatch: overrides optim.microbatch_size (the privacy plan is rebuilt: Bmax is a
      multiple of it).
    clients_per_device: overrides ceil(num_clients / client groups).
    num_devices: devices of the mesh (default: all; mesh.fsdp of them per client group).
    parts: (arch, tokenizer, graphdef, lora, frozen) to reuse across calls.
  """
  if microbatch:
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim,
                                                             microbatch_size=int(microbatch)))
  if parts is None:
    arch, tok = architecture(cfg)
    parts = (arch, tok, *abstract_parts(cfg, arch))
  arch, tok, graphdef, lora, frozen = parts
  d, k, fsdp = cfg.data, cfg.fed.num_clients, cfg.mesh.fsdp
  plan = build_lib.privacy_plan(cfg)
  bound = d.max_client_size or d.batch_size
  max_batch, _ = build_lib.sampling_shape(cfg, plan, [bound] * k)
  n = num_devices or jax.device_count()
  if n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices.")
  groups = n // fsdp
  per = clients_per_device or math.ceil(k / groups)
  slots = per * groups
  mesh = round_lib.make_mesh(n, fsdp)
  task = tasks.get(d.task)
  spec, server_tx, step = round_lib.run_round_step(cfg, plan, graphdef,
                                                  task.loss_positions(tok, d), mesh,
                                                  build_lib.loss_labels(cfg, task, tok))

  rep, by_client = NamedSharding(mesh, P()), round_lib.client_sharding(mesh)
  state = jax.eval_shape(lambda l: round_lib.init_state(l, server_tx, cfg.dp.client_clip_norm),
                         lora)
  state = _abstract(state, jax.tree.map(lambda _: rep, state))
  frozen_a = _abstract(frozen, round_lib.frozen_shardings(mesh, frozen))
  t, s = d.max_length, cfg.fed.local_steps

  def clients(shape, dtype):
    return jax.ShapeDtypeStruct((slots, *shape), dtype, sharding=by_client)

  data = {"tokens": clients((bound, t), jnp.int32), "mask": clients((bound, t), jnp.bool_),
          "targets": clients((bound, t), jnp.int32), "loss_mask": clients((bound, t), jnp.bool_)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  t0 = time.time()
  compiled = step.lower(state, frozen_a, data, clients((s, max_batch), jnp.int32),
                        clients((s, max_batch), jnp.bool_), clients((), jnp.float32),
                        clients((), jnp.int32), key,
                        clients((s, max_batch // spec.microbatch), jnp.int32)).compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  frozen_bytes = 0
  for x in jax.tree.leaves(frozen_a):
    shard = x.sharding.shard_shape(x.shape)
    frozen_bytes += int(np.prod(shard)) * x.dtype.itemsize
  lora_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(lora)})
  return MemoryPlan(
      microbatch=spec.microbatch, max_batch=max_batch, clients_per_device=per,
      mesh=dict(mesh.shape), argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), frozen_bytes=frozen_bytes,
      lora_dtype=",".join(lora_dtypes), compile_seconds=seconds)


def fit(cfg: RunConfig, device_bytes: int, **kw) -> tuple[MemoryPlan | None, list[MemoryPlan]]:
  """(the plan of the largest power-of-two microbatch whose round fits in `device_bytes`, or
  None; every plan tried). Stops at the first that does not fit or at the physical batch."""
  arch, tok = architecture(cfg)
  parts = (arch, tok, *abstract_parts(cfg, arch))
  tried, best, mb = [], None, 1
  while True:
    p = plan_round(cfg, microbatch=mb, parts=parts, **kw)
    tried.append(p)
    if p.total_bytes > device_bytes:
      break
    best = p
    if mb >= p.max_batch:
      break
    mb *= 2
  return best, tried
