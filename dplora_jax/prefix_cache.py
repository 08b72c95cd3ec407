"""The frozen prefix's activations: computed once per run, and optionally kept across runs.

With `lora.first_layer` s > 0 nothing below layer s trains, so each client's activations entering
layer s are a fixed function of its rows and the base weights (`lora.frozen_prefix`): `compute`
runs layers [0, s) once per run instead of at every step. With `model.prefix_cache_dir` they are
also kept on disk, under a key of everything they depend on (the frozen weights' bytes, the LoRA
factors below s where their B is not zero, the model section of the config, s, the chunking, the
rows, jax's version), so the next run on the same rows (a sweep's other points: another eps, clip
or learning rate) reads them instead of recomputing (about 13 of a run's 28 minutes for the 9,500
finance rows at layer 29 on 2 cores).

What is kept is not a DP release: it is a deterministic function of the private training rows,
as sensitive as the rows themselves. The files are owner-only (0600 in a 0700 directory), named
by a keyed hash (the directory's own random key: a name says nothing of the rows without it), hold
only the clients of this process, and never enter a workdir, a checkpoint or an export. Keep the
directory where the data lives, and delete it with the data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os

import jax
import numpy as np

from dplora_jax import lora as lora_lib, report, workdir as workdir_lib
from dplora_jax.data import buckets as buckets_lib

FORMAT = b"dplora-prefix-cache-v1"
# model fields that change how the prefix is computed but not its values
_EXECUTION_ONLY = ("cache_prefix", "prefix_cache_dir", "remat", "remat_policy")


def compute(s, stacked: dict, rows, chunk: int = 32) -> np.ndarray:
  """[slots, n_max, T, D]: each client's activations entering layer `lora.first_layer`.

  Only the rows this process owns (`rows`; None = all) are filled: a client's activations are
  computed where its data lives. Rows are taken shortest first, `chunk` at a time, at the
  shortest multiple of 8 that holds the chunk's longest row (right padding and causal attention:
  the values at real positions are those of the full row; positions after a row's end stay zero
  and are never read by a real one)."""
  fn = jax.jit(functools.partial(lora_lib.frozen_prefix, s.graphdef))
  tokens, mask = stacked["tokens"], stacked["mask"]
  slots, n, t = tokens.shape
  shape = jax.eval_shape(fn, s.lora, s.frozen, np.zeros((chunk, t), tokens.dtype),
                         np.zeros((chunk, t), mask.dtype))
  out = np.zeros((slots, n, t, shape.shape[-1]), shape.dtype)
  for i in _filled(s, slots, rows):
    for sel, width in buckets_lib.length_chunks(mask[i, :len(s.clients[i])].sum(1), t, chunk):
      tok, m = tokens[i, sel, :width], mask[i, sel, :width]
      if len(sel) < chunk:  # one shape per width, one compile
        tok = np.concatenate([tok, np.zeros((chunk - len(sel), width), tok.dtype)])
        m = np.concatenate([m, np.zeros((chunk - len(sel), width), m.dtype)])
      out[i, sel, :width] = np.asarray(fn(s.lora, s.frozen, tok, m))[:len(sel)]
  return out


def _filled(s, slots: int, rows) -> list[int]:
  """The slots this process fills: its own, and only those holding a client."""
  return [i for i in (range(slots) if rows is None else rows) if i < len(s.clients)]


def _secret(cache_dir: str) -> bytes:
  """The directory's own random key (32 bytes in DIR/key, 0600), created by the first run: written
  whole to a temporary file, then linked into place (a run starting beside it reads the whole key
  or creates it)."""
  path = os.path.join(cache_dir, "key")
  if not os.path.exists(path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with workdir_lib.private_open(tmp, "wb") as f:
      f.write(os.urandom(32))
    try:
      os.link(tmp, path)  # fails if another run linked its key first: then that one is read
    except FileExistsError:
      pass
    finally:
      os.remove(tmp)
  with open(path, "rb") as f:
    secret = f.read()
  if len(secret) != 32:
    raise ValueError(f"model.prefix_cache_dir: {path} is not a 32-byte key (damaged, or not "
                     "written by dplora_jax); remove the directory or choose another.")
  return secret


def key(s, stacked: dict, rows, secret: bytes, chunk: int = 32) -> str:
  """The cache key: a keyed hash (HMAC-SHA256 under the directory's secret) of everything the
  activations depend on. Keyed, because a plain hash of the rows would be an exact, unnoised
  statistic of the private data in a file name and a log line: whoever knew all rows but one
  could test each candidate for it."""
  h = hmac.new(secret, FORMAT, hashlib.sha256)
  model = {k: v for k, v in dataclasses.asdict(s.cfg.model).items() if k not in _EXECUTION_ONLY}
  h.update(repr((sorted(model.items()), s.cfg.lora.first_layer, chunk, jax.__version__,
                 stacked["tokens"].shape)).encode())
  # the frozen weights; and the LoRA factors of the frozen layers (leading layer axis [L, ...])
  # with their scaling, unless every B there is zero (a random init: then they add exactly 0,
  # whatever A and the seed; `lora.init_from` may bring nonzero ones)
  below = jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda a: np.asarray(a[:s.cfg.lora.first_layer]), s.lora))
  trees = [jax.tree_util.tree_leaves_with_path(s.frozen)]
  if any(np.any(a != 0) for p, a in below if "lora_b" in jax.tree_util.keystr(p)):
    h.update(repr((s.cfg.lora.alpha, s.cfg.lora.rank, s.cfg.lora.use_rslora)).encode())
    trees.append(below)
  for leaves in trees:
    for path, leaf in leaves:
      a = np.asarray(leaf)
      h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
      h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
  for i in _filled(s, stacked["tokens"].shape[0], rows):
    n = len(s.clients[i])
    h.update(f"slot {i}: {n} rows".encode())
    for k in ("tokens", "mask"):
      h.update(np.ascontiguousarray(stacked[k][i, :n]).data)
  return h.hexdigest()


def load_or_compute(s, stacked: dict, rows, cache_dir: str = "",
                    chunk: int = 32) -> tuple[np.ndarray, str]:
  """(the activations of `compute`, where they came from: "computed", "read from DIR" or
  "computed, kept in DIR"). Without `cache_dir` this is `compute`. A file that does not read
  back whole (a killed writer leaves only a temporary file; a foreign or damaged one fails the
  shape check) is recomputed and replaced."""
  if not cache_dir:
    return compute(s, stacked, rows, chunk), "computed"
  workdir_lib.make_private_dir(cache_dir)
  path = os.path.join(cache_dir, f"prefix-{key(s, stacked, rows, _secret(cache_dir), chunk)}.npy")
  filled = _filled(s, stacked["tokens"].shape[0], rows)
  if os.path.isfile(path):
    try:  # mapped: read once, straight into `out`
      kept = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
      kept = None
    slots, n, t = stacked["tokens"].shape
    if kept is not None and kept.ndim == 4 and kept.shape[:3] == (len(filled), n, t):
      out = np.zeros((slots, *kept.shape[1:]), kept.dtype)
      out[filled] = kept
      return out, f"read from {cache_dir}"
  out = compute(s, stacked, rows, chunk)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with workdir_lib.private_open(tmp, "wb") as f:
      np.save(f, out[filled], allow_pickle=False)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out, f"computed, kept in {cache_dir}"


def progress_line(first_layer: int, source: str, hidden: np.ndarray, seconds: float) -> str:
  """The run's line about the prefix. Its size is given per example ([T, D]): the array's total
  follows the largest client's size, which is private (client sizes are never released)."""
  return (f"frozen layers 0-{first_layer - 1}: each client's activations {source} "
          f"({report.human_bytes(hidden[0, 0].nbytes)} per example, {seconds:.0f} s)")
