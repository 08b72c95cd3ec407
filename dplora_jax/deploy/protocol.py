"""What travels between the server and an institution's client, and nothing else.

Messages are plain dicts `{"arrays": {name: float32 ndarray}, "config": {key: scalar}}`; the
Flower adapter (`deploy.flower`) carries them as an `ArrayRecord` and a `ConfigRecord`. Both sides
check every message against the schema below, so a field that is not listed here cannot leave a
client by accident (and the server refuses a reply that carries one).

Server -> client (public: the config, the global LoRA, which the client would also see as part of
the released model):
- "hello": {run_id, config (JSON of the public RunConfig), model_fingerprint}.
- "train": the same plus {round, client_clip}, and the global LoRA as arrays (FedAvg: A and B; FFA:
  B only, A being a deterministic function of the public config seed).

Client -> server:
- hello reply: {client_id, status, reason, dplora_version}.
- train reply: {client_id, round, status ("ok" | "refused"), reason, epsilon, epsilon_budget} and,
  when ok, the update as arrays (`dp.release`: in `sample` mode post-processing of the client's
  DP-SGD releases; under client-level DP clipped to S by the client). `epsilon` is the client's
  own example-level ledger after this round: a function of the public config and of how many
  rounds it trained, which the server knows anyway.

Never sent: the client's noise key or DP-randomness root, its sampler state, its data, its size,
its loss or any other statistic of its data.

`check_deployable` is what a deployment implements; the server checks it before starting and
every client again (it does not take the server's word).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np

PyTree = Any

HELLO, TRAIN = "hello", "train"
OK, REFUSED = "ok", "refused"

INSTRUCTION_KEYS = {
    HELLO: {"run_id", "config", "model_fingerprint"},
    TRAIN: {"run_id", "config", "model_fingerprint", "round", "client_clip"},
}
REPLY_KEYS = {
    HELLO: {"client_id", "status", "reason", "dplora_version"},
    TRAIN: {"client_id", "round", "status", "reason", "epsilon", "epsilon_budget"},
}


SUPPORTED_MODES = ("sample", "sample+client", "client", "none")


class ProtocolError(ValueError):
  """A message that does not follow the schema (a bug, or a peer that is not dplora_jax)."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def lora_names(tree: PyTree) -> list[str]:
  """Stable names of the LoRA leaves (their pytree paths, e.g. "layers.attn.q.lora_b"), in
  leaf order."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [_key_name(k) for k in path]
    out.append(".".join(parts[:-1] if parts and parts[-1] == "value" else parts))
  return out


def lora_to_arrays(tree: PyTree) -> dict[str, np.ndarray]:
  """The LoRA pytree as named float32 arrays (what travels)."""
  return {n: np.asarray(x, np.float32) for n, x in zip(lora_names(tree), jax.tree.leaves(tree))}


def arrays_to_lora(arrays: dict[str, np.ndarray], like: PyTree) -> PyTree:
  """The inverse of `lora_to_arrays`, into the structure (and dtypes) of `like`.

  Raises:
    ProtocolError: names or shapes differ from `like` (another LoRA shape, or a corrupt message).
  """
  names = lora_names(like)
  if set(arrays) != set(names):
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    raise ProtocolError(f"LoRA arrays do not match this run's LoRA (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}).")
  leaves = []
  for n, ref in zip(names, jax.tree.leaves(like)):
    a = np.asarray(arrays[n])
    if a.shape != tuple(ref.shape):
      raise ProtocolError(f"LoRA array {n} has shape {a.shape}, expected {tuple(ref.shape)}.")
    if not np.isfinite(a).all():
      raise ProtocolError(f"LoRA array {n} is not finite.")
    leaves.append(a.astype(ref.dtype))
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def digest(arrays: dict[str, np.ndarray]) -> str:
  """sha256 of named arrays (names, shapes, dtypes and bytes): identifies a global model."""
  h = hashlib.sha256()
  for n in sorted(arrays):
    a = np.ascontiguousarray(arrays[n])
    h.update(n.encode())
    h.update(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def instruction_digest(message: dict) -> str:
  """sha256 of a train instruction's config values and arrays: what a client's release is a
  function of, besides its data and its randomness."""
  h = hashlib.sha256(json.dumps(message["config"], sort_keys=True).encode())
  h.update(digest(message["arrays"]).encode())
  return h.hexdigest()


def instruction(kind: str, *, run_id: str, config: dict, model_fingerprint: str,
                round_: int = 0, client_clip: float = 0.0,
                lora: dict[str, np.ndarray] | None = None) -> dict:
  """A server -> client message."""
  c = {"run_id": run_id, "config": json.dumps(config, sort_keys=True),
       "model_fingerprint": model_fingerprint}
  if kind == TRAIN:
    c |= {"round": int(round_), "client_clip": float(client_clip)}
  return check(kind, {"arrays": dict(lora or {}), "config": c}, reply=False)


def reply(kind: str, arrays: dict[str, np.ndarray] | None = None, **config) -> dict:
  """A client -> server message (checked against the schema before it leaves)."""
  return check(kind, {"arrays": dict(arrays or {}), "config": config}, reply=True)


def refusal(kind: str, client_id: int, reason: str, **extra) -> dict:
  c = {"client_id": int(client_id), "status": REFUSED, "reason": reason}
  if kind == TRAIN:
    c = {"round": -1, "epsilon": float("nan"), "epsilon_budget": float("nan")} | c | extra
  else:
    c |= {"dplora_version": ""} | extra
  return reply(kind, **c)


def check(kind: str, message: dict, *, reply: bool) -> dict:
  """Validates a message against the schema; returns it.

  Raises:
    ProtocolError: an unknown kind, a missing or extra config key, a non-scalar config value,
      arrays where none may travel, or non-float32 arrays.
  """
  table = REPLY_KEYS if reply else INSTRUCTION_KEYS
  if kind not in table:
    raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(table)}.")
  if set(message) != {"arrays", "config"}:
    raise ProtocolError(f"a {kind} message holds 'arrays' and 'config', got {sorted(message)}.")
  keys = set(message["config"])
  if keys != table[kind]:
    raise ProtocolError(f"{'reply' if reply else 'instruction'} {kind}: config keys "
                        f"{sorted(keys)} differ from the schema {sorted(table[kind])}.")
  for k, v in message["config"].items():
    if not isinstance(v, (str, int, float, bool)):
      raise ProtocolError(f"{kind} config value {k} is a {type(v).__name__}; only scalars travel.")
  arrays = message["arrays"]
  if arrays and (kind == HELLO or (reply and message["config"]["status"] != OK)):
    raise ProtocolError(f"a {kind} {'refusal' if reply else 'message'} carries no arrays.")
  for n, a in arrays.items():
    if np.asarray(a).dtype != np.float32:
      raise ProtocolError(f"array {n} is {np.asarray(a).dtype}; LoRA travels as float32.")
  return message


def check_deployable(cfg) -> None:
  """Refuses configs (`config.RunConfig`) the deployment does not implement, naming the field.

  Raises:
    ValueError: paper mode, adaptive client clipping, weighting by size, no public size bound,
      noise added by the aggregator, a centred LoRA.
  """
  if cfg.dp.mode not in SUPPORTED_MODES:
    raise ValueError(f"dp.mode={cfg.dp.mode!r} is not deployable; use one of {SUPPORTED_MODES}.")
  if cfg.dp.noise_at != "client":
    raise ValueError("dp.noise_at='server' is not deployable: each institution would send its "
                     "clipped, un-noised gradient sum over the network to a server it must "
                     "trust (no secure aggregation here); use dp.noise_at='client'.")
  if cfg.dp.adaptive:
    raise ValueError("dp.adaptive_clip_quantile > 0: adaptive client clipping is not deployable "
                     "yet (clients would send their unclipped bit); use a fixed "
                     "dp.client_clip_norm.")
  if cfg.fed.weighting != "uniform":
    raise ValueError("fed.weighting='examples' needs every client's size; use 'uniform'.")
  if cfg.lora.centre != "none":
    raise ValueError(f"lora.centre={cfg.lora.centre!r} is not deployable yet: the server has no "
                     "round that gathers the clients' noised centre sums; use lora.centre='none' "
                     "(or the one-program simulation, launch.train).")
  if not cfg.data.max_client_size:
    raise ValueError("data.max_client_size=0: a deployment needs the public bound on client "
                     "sizes (the clients' sampling rate and batch derive from it).")
