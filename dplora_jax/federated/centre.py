"""The centre of a centred LoRA (`lora.centre`): each adapted layer's mean input, released once.

A centred LoRA layer computes delta y = scaling ((x - c) A) B. Its c [L, in] is the mean over
every client's examples of the layer's input under the base model (the factors start at a zero
product), each example first averaged over its real tokens (`lora.centre='tokens'`) or its loss
positions ('loss'). The residual stream of SmolLM2 shares ~97% of its squared norm across rows
(docs/results.md 4o); with c removed, a clipped per-example gradient of A no longer spends its
norm on that shared part.

The release, before round 1 (`compute`):
1. each client runs one forward over its examples (from the cached frozen prefix when there is
   one) and takes each example's mean input of every adapted Dense of the trained layers;
2. each example's means, divided by the public bound of their layer and target (`bounds`: from
   the base model on random tokens) and concatenated over layers and targets, are clipped
   together and summed with a constant count coordinate (`dp.statistics.mean_sums`: one example moves (sums, count) by at
   most 1 in L2 under add/remove);
3. the Gaussian mechanism with `dp.centre_noise_multiplier`: each client noises its own sums
   (dp.noise_at='client'), or a trusted aggregator noises their total once ('server'); dp.mode
   'none' releases them exact;
4. the server sums and divides (post-processing): c = bound * sums / count.
Its event, Gaussian(sigma) without sampling, is composed into the example-level guarantee
(`dp.plan.centre_segments`). The noise key is the run's secret `DPRandomness.centre_key`.

The released centre is written once to WORKDIR/lora_centre.safetensors (owner-only) and read
back by every later start of the same workdir (a resume, or a restart before the first
checkpoint: a second, independently noised release would not be accounted) and by the export.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from dplora_jax import checkpoint as ckpt_lib, config as config_lib, distributed
from dplora_jax import lora as lora_lib
from dplora_jax.data import buckets as buckets_lib
from dplora_jax.dp import plan as plan_lib, statistics

CENTRE_FILE = "lora_centre.safetensors"


REFERENCE_ROWS = 8  # sequences of random tokens that set the public bounds


def bounds(cfg, setup, vocab_size: int) -> dict[str, np.ndarray]:
  """{target: [(L - first_layer) * in]}: the public bound on one example's mean input, per layer
  of each target (repeated over its coordinates). It is lora.centre_clip * sqrt(blocks) times the
  median norm of the same mean over REFERENCE_ROWS sequences of uniformly random tokens (seed 0)
  under the base model: a function of the public weights only. With every (layer, target) block
  of an example within its bound, the concatenation has norm <= 1 and nothing is clipped."""
  t = int(cfg.data.max_length)
  tokens = jax.random.randint(jax.random.key(0), (REFERENCE_ROWS, t), 0, vocab_size, jnp.int32)
  mask = jnp.ones((REFERENCE_ROWS, t), bool)
  sums = jax.jit(lora_lib.input_sums, static_argnums=0)(
      setup.graphdef, setup.lora, setup.frozen, tokens, mask, mask / t)
  blocks = sum(v.shape[0] for v in sums.values())
  out = {}
  for name, v in sums.items():  # v [L - s, rows, in]
    ref = np.median(np.linalg.norm(np.asarray(v, np.float64), axis=-1), axis=1)
    out[name] = np.repeat(float(cfg.lora.centre_clip) * math.sqrt(blocks) * ref,
                          v.shape[-1]).astype(np.float32)
  return out


def _weights(stacked: dict, i: int, sel, width: int, how: str) -> np.ndarray:
  w = (stacked["mask"] if how == "tokens" else stacked["loss_mask"])[i, sel, :width]
  w = w.astype(np.float32)
  return w / np.maximum(w.sum(1, keepdims=True), 1.0)


def client_sums(graphdef, lora, frozen, stacked: dict, clients, how: str,
                bound: dict[str, float], chunk: int = 32):
  """Per real client k: (sums {target: [(L - s) * in]}, count), un-noised (`mean_sums`)."""
  def one(lora, frozen, tokens, mask, weights, valid, hidden):
    sums = lora_lib.input_sums(graphdef, lora, frozen, tokens, mask, weights, hidden)
    blocks = {t: jnp.moveaxis(v, 1, 0).reshape(v.shape[1], -1) for t, v in sums.items()}
    return statistics.mean_sums(blocks, bound, valid)

  fn = jax.jit(one)
  t = stacked["tokens"].shape[-1]
  out = []
  for i, c in enumerate(clients):
    n = len(c)
    total, count = None, 0.0
    for sel, width in buckets_lib.length_chunks(stacked["mask"][i, :n].sum(1), t, chunk):
      pad = chunk - len(sel)
      def rows(a):
        a = a[i, sel, :width]
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
      weights = _weights(stacked, i, sel, width, how)
      if pad:
        weights = np.concatenate([weights, np.zeros((pad, width), np.float32)])
      valid = np.arange(chunk) < len(sel)
      hidden = rows(stacked["hidden"]) if "hidden" in stacked else None
      sums, cnt = fn(lora, frozen, rows(stacked["tokens"]), rows(stacked["mask"]), weights, valid,
                     hidden)
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      total = sums if total is None else {k: total[k] + sums[k] for k in total}
      count += float(cnt)
    out.append((total, count))
  return out


def release(per_client: list, noise_multiplier: float, noise_at: str, key: jax.Array):
  """(sums, count) of all clients as the server holds them: each client's noised (noise_at
  'client'), or their exact total noised once by the aggregator ('server'); sigma 0: exact."""
  def noised(sums, count, k):
    s, c = statistics.release_mean_sums(k, {n: jnp.asarray(v, jnp.float32)
                                            for n, v in sums.items()}, count, noise_multiplier)
    return {n: np.asarray(v, np.float64) for n, v in s.items()}, float(c)

  if noise_at == "client":
    parts = [noised(s, c, jax.random.fold_in(key, k)) for k, (s, c) in enumerate(per_client)]
  else:
    parts = per_client
  sums = {n: sum(p[0][n] for p in parts) for n in parts[0][0]}
  count = sum(p[1] for p in parts)
  if noise_at == "server":
    sums, count = noised(sums, count, jax.random.fold_in(key, len(per_client)))
  return sums, count


def noise_multiplier(cfg) -> float:
  """The noise of the plan's own "lora centre" segment (0 without DP): accounted == applied."""
  segments = plan_lib.centre_segments(cfg)
  return segments[0].noise_multiplier if segments else 0.0


def compute(cfg, setup, stacked: dict, key: jax.Array) -> dict[str, np.ndarray]:
  """{target: c [L, in] float32}: the released centre of `setup`'s clients (rows of `stacked`,
  with the cached prefix under "hidden" when there is one). Layers below `lora.first_layer`
  keep c = 0 (their factors never train).

  Raises:
    ValueError: a multi-process run (each process holds only its own clients' data).
  """
  if distributed.multi_process():
    raise ValueError(f"lora.centre={cfg.lora.centre!r} in a multi-process run: the centre's sums "
                     "are not yet gathered across processes; run it in one process.")
  model = lora_lib.merge(setup.graphdef, setup.lora, setup.frozen)
  bound = bounds(cfg, setup, model.config.vocab_size)
  sigma = noise_multiplier(cfg)
  per_client = client_sums(setup.graphdef, setup.lora, setup.frozen, stacked, setup.clients,
                           cfg.lora.centre, bound)
  sums, count = release(per_client, sigma, cfg.dp.noise_at, key)
  means = statistics.mean_from_sums(sums, count, bound)
  first, layers_ = cfg.lora.first_layer, model.config.num_layers
  out = {}
  for name, dense in lora_lib.target_modules(model, cfg.lora.targets).items():
    c = np.zeros((layers_, dense.in_features), np.float32)
    c[first:] = np.asarray(means[name], np.float32).reshape(layers_ - first, dense.in_features)
    out[name] = c
  return out


def with_centre(setup, values: dict) -> None:
  """Sets the centre into `setup.frozen` (in place; the graph and the LoRA tree are unchanged)."""
  model = lora_lib.merge(setup.graphdef, setup.lora, setup.frozen)
  lora_lib.set_centre(model, values)
  _, _, setup.frozen = lora_lib.split(model)


def _config_json(cfg) -> str:
  return json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str)


def save(workdir: str, cfg, values: dict):
  """Writes the centre once, atomically, owner-only, with the run's config in its metadata."""
  path = os.path.join(workdir, CENTRE_FILE)
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, tmp,
            metadata={"config": _config_json(cfg)})
  os.chmod(tmp, 0o600)
  os.replace(tmp, path)


def load(workdir: str, cfg) -> dict[str, np.ndarray] | None:
  """The centre written by an earlier start of this run, or None when there is none.

  Raises:
    ValueError: the file is unreadable or belongs to a run with a different config.
  """
  from safetensors import safe_open
  path = os.path.join(workdir, CENTRE_FILE)
  if not os.path.exists(path):
    return None
  try:
    with safe_open(path, framework="numpy") as f:
      saved = json.loads((f.metadata() or {})["config"])
    values = load_file(path)
  except Exception as e:
    raise ValueError(f"{path}: unreadable centre file ({type(e).__name__}: {e}); it holds this "
                     "run's released centre: restore it, or start in a new --workdir.") from e
  changed = ckpt_lib.config_changes(saved, json.loads(_config_json(cfg)))
  if changed:
    raise ValueError(f"{path} is the centre of a run with another config (changed: "
                     f"{', '.join(changed[:5])}); use a new --workdir.")
  return values


def ensure(cfg, setup, stacked: dict, key: jax.Array, workdir: str, main: bool = True,
           progress: bool = False, resumed: bool = False) -> dict[str, np.ndarray]:
  """The run's centre: read from the workdir when an earlier start released it, else computed,
  released and written (process 0). Sets it into `setup.frozen`.

  Raises:
    ValueError: a resumed run whose centre file is gone (a new release would not be accounted).
  """
  values = load(workdir, cfg)
  if values is None and resumed:
    raise ValueError(f"{os.path.join(workdir, CENTRE_FILE)} is missing, but the workdir holds "
                     "checkpoints of a centred run: its centre was released before round 1 and "
                     "another, independently noised release would not be accounted; restore the "
                     "file or start in a new --workdir.")
  if values is None:
    t0 = time.time()
    values = compute(cfg, setup, stacked, key)
    if main:
      save(workdir, cfg, values)
    if progress and main:
      print(f"lora centre ({cfg.lora.centre}): released once (sigma {noise_multiplier(cfg)}, "
            f"{time.time() - t0:.0f} s)", flush=True)
  with_centre(setup, values)
  return values
