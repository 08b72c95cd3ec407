"""Orbax checkpoints of a run, with its privacy ledger, so that a resumed run is the same run.

A checkpoint (one orbax step per saved round, under WORKDIR/checkpoints) holds:
- "state": the round state (global LoRA, server optimizer state, client-level clip S, round).
  Client optimizers are re-initialised every round (clients are stateless), so there is no client
  optimizer state to save.
- "meta" (JSON): format version, the full config, the base model's path and fingerprint (the frozen
  weights are referenced, never saved), the privacy ledger (`dp.ledger.Ledger`), and the host state
  (`host_state.HostState`: the secret root of all DP randomness, from which every sampling
  stream derives; communication totals, rounds done).

A checkpoint therefore holds what strips the noise (the noise root, the samplers, intermediate
LoRA): every file is written owner-only (0600, directories 0700), and nothing of it but the final
LoRA and the ledger ever reaches an export.

Saves are synchronous and atomic: orbax writes into a temporary directory and renames it when
complete, so a kill mid-save leaves no step that `latest()` returns. A failing save (disk full)
raises and leaves every earlier checkpoint intact. Nothing here ever deletes a finished
checkpoint except orbax's keep-the-newest-K rotation after a successful save.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dplora_jax import config as config_lib, workdir as workdir_lib
from dplora_jax.dp.ledger import Ledger

# 2: host state with secret sampling randomness, ledger segments; 3: per-round sampling streams
# from the root (a format-2 checkpoint resumes on them)
FORMAT_VERSION = 3


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (corrupt, incompatible, newer format) or saved."""


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out |= _flatten(v, key + ".")
    else:
      out[key] = v
  return out


def config_changes(saved: dict, current: dict) -> list[str]:
  """Dotted fields whose values differ, performance fields aside. A field the saved config lacks
  was added after it was written and has its default there (the behaviour from before the field
  existed); one the current config lacks (removed since) counts as changed."""
  b = _flatten(current)
  a = {k: v for k, v in _flatten(config_lib.defaults()).items() if k in b} | _flatten(saved)
  return sorted(k for k in set(a) | set(b) if k not in config_lib.RESUME_MAY_CHANGE
                and a.get(k, "<missing>") != b.get(k, "<missing>"))


def state_tree(state) -> dict:
  """What orbax saves: the round state's fields."""
  return {"round": state.round, "lora": state.lora, "server_opt": state.server_opt,
          "client_clip": state.client_clip}


class Checkpointer:
  """CheckpointManager in WORKDIR/checkpoints keeping the newest `keep` rounds.

  A writer (the training run) first deletes, synchronously, the temporary directories a killed
  save left behind. Orbax's own cleanup (`cleanup_tmp_directories`) runs in a background thread
  that `close()` does not wait for, so two managers opened one after the other on the same
  directory raced to delete the same files. A reader (`read_only=True`: export, inspection) never
  deletes anything, so it is safe to open while a run is saving.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False,
               primary: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.primary = primary
    try:
      if not read_only and primary:
        _remove_unfinished_saves(self.directory)
        workdir_lib.make_private_dir(self.directory)
      if not read_only and jax.process_count() > 1:  # the others wait for the clean-up
        multihost_utils.sync_global_devices("dplora_jax checkpoint directory ready")
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               create=not read_only,
                                               read_only=read_only,
                                               enable_async_checkpointing=False))
    except OSError as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, round_: int, state, meta: dict):
    """Saves round `round_` (atomic, owner-only).

    Raises:
      CheckpointError: the save failed (e.g. disk full); earlier checkpoints are untouched.
    """
    meta = dict(meta, format_version=FORMAT_VERSION, round=round_)
    try:
      self.manager.save(round_, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_tree(state)),
          meta=ocp.args.JsonSave(meta)), force=True)
      if self.primary:
        workdir_lib.restrict_tree(self.directory)
    except (OSError, ValueError) as e:
      previous = [s for s in self.manager.all_steps() if s != round_]
      raise CheckpointError(
          f"saving the checkpoint of round {round_} to {self.directory} failed: {e}. The newest "
          f"intact checkpoint is round {max(previous) if previous else None}; free space or fix "
          "the directory and rerun the same command to resume from it.") from e

  def read_meta(self, round_: int) -> dict:
    """The JSON part of a checkpoint (cheap: no arrays), validated.

    Raises:
      CheckpointError: unreadable, or written by a newer dplora_jax.
    """
    path = os.path.join(self.directory, str(round_))
    try:
      meta = self.manager.restore(round_, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: "
                            f"{e}); move it away to resume from an earlier one.") from e
    version = meta.get("format_version")
    if version == 1:
      raise CheckpointError(f"checkpoint {path} was written by dplora_jax format 1, whose example "
                            "and client sampling came from the public config seed (its "
                            "amplification by sampling does not hold); it cannot be resumed. "
                            "Start a new run in a new --workdir.")
    if not isinstance(version, int) or version > FORMAT_VERSION:
      raise CheckpointError(f"checkpoint {path} has format version {version!r}; this dplora_jax "
                            f"reads versions <= {FORMAT_VERSION}: upgrade dplora_jax.")
    return meta

  def restore_state(self, round_: int, target: dict) -> dict:
    """Restores the arrays of round `round_` into the structure, dtypes and shardings of `target`.

    Raises:
      CheckpointError: missing or damaged array files, or shapes that do not match.
    """
    path = os.path.join(self.directory, str(round_))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self.manager.restore(round_, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
      return out["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {path} is corrupt or does not match this run "
                            f"({type(e).__name__}: {e}); move it away to resume from an earlier "
                            "one.") from e

  def close(self):
    self.manager.close()


def _remove_unfinished_saves(directory: str):
  """Deletes the orbax temporary directories of saves that never committed (a killed run)."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ocp.utils.TMP_DIR_SUFFIX in name:
      path = os.path.join(directory, name)
      shutil.rmtree(path, ignore_errors=True)  # tolerant of anything deleting the same files
      if os.path.exists(path):
        raise OSError(f"cannot delete the unfinished save {path}")


def check_resumable(meta: dict, cfg, fingerprint: str | None = None, path: str = ""):
  """Refuses to resume when the config or base model changed in a way that matters.

  Raises:
    CheckpointError: naming every changed field (privacy, sampling, clients, LoRA shape, data,
      seeds...) or the changed model checksum.
  """
  changed = config_changes(meta["config"], config_lib.to_dict(cfg))
  if changed:
    saved = _flatten(meta["config"])
    now = _flatten(config_lib.to_dict(cfg))
    detail = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} -> {now.get(k, '<missing>')!r}"
                       for k in changed[:8])
    raise CheckpointError(
        f"the workdir's checkpoint {path} was written with a different config ({detail}). These "
        "fields change the privacy guarantee, the shapes or the numbers, so resuming would not be "
        f"the same run; use a new --workdir. Only {', '.join(config_lib.RESUME_MAY_CHANGE)} "
        "may change.")
  if fingerprint is not None and meta["model"]["fingerprint"] != fingerprint:
    raise CheckpointError(
        f"the base model changed since checkpoint {path}: {meta['model']['path']} had checksum "
        f"{meta['model']['fingerprint'][:16]}..., now {fingerprint[:16]}...; the LoRA was trained "
        "on other weights. Use the original model file or a new --workdir.")


def check_ledger(meta: dict, expected: Ledger, path: str = ""):
  """Refuses a checkpoint whose ledger is not the plan's ledger after the same rounds.

  Raises:
    CheckpointError: the saved ledger differs (the accounting changed under the run).
  """
  saved = Ledger.from_dict(meta["ledger"])
  if saved.entries != expected.entries or saved.rounds != expected.rounds:
    raise CheckpointError(f"checkpoint {path}: its privacy ledger ({saved.epsilons()} after "
                          f"{saved.rounds} rounds) is not this plan's ({expected.epsilons()}); "
                          "the accounting changed, so resuming would misstate eps. Use a new "
                          "--workdir.")


def restored_round_state(tree: dict, state_cls):
  return state_cls(tree["round"], tree["lora"], tree["server_opt"], tree["client_clip"])

