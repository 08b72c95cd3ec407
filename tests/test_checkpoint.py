"""Checkpoints: kill -9 and resume is the same run; refused resumes; damaged checkpoints (disk
full and the workdir lock: test_workdir.py)."""

import glob
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from dplora_jax import checkpoint, config as config_lib, train

ARG = "rounds=4,dp_seed=5,client_rate=0.75,server_opt=fedadam"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(arg=ARG):
  return config_lib.from_config_dict(tiny.get_config(arg))


def _metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  for l in lines:
    assert "seconds" not in l  # round times are private diagnostics
  return lines


REF_STATE = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("reference"))
  res = train.run(_cfg(), wd, progress=False)
  REF_STATE["state"] = res.state
  return wd, res.summary


def test_killed_at_every_save_phase_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path,
                                                                                reference):
  """Three kills in a row, each process resuming what the previous one left: before round 1's
  save (nothing saved: the next starts afresh), during round 2's (orbax's temporary directory is
  never picked up: the next resumes from round 1 and deletes it), after round 3's; the last
  resume finishes the run. The result is bitwise the uninterrupted run."""
  wd = str(tmp_path)
  for kill_round, phase in ((1, "before_save"), (2, "during_save"), (3, "after_save")):
    proc = subprocess.run([sys.executable, "-m", "tests.kill_run", wd, ARG, str(kill_round),
                           phase], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    mgr = checkpoint.Checkpointer(wd, read_only=True)
    # a kill mid-save never leaves a checkpoint that resume would pick up
    assert mgr.latest() == (kill_round if phase == "after_save" else (kill_round - 1 or None))
    mgr.close()
  res = train.run(_cfg(), wd, progress=False)
  resumed = res.summary
  ref_wd, ref = reference
  assert resumed["resumed_from_round"] == 3
  assert not glob.glob(os.path.join(wd, "checkpoints", "*" + ocp.utils.TMP_DIR_SUFFIX + "*"))
  for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(REF_STATE["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # LoRA, server Adam, S, round
  assert resumed["epsilon"] == ref["epsilon"]
  assert resumed["privacy"] == ref["privacy"] and resumed["ledger"] == ref["ledger"]
  assert resumed["bytes_up_total"] == ref["bytes_up_total"]
  assert _metrics(wd) == _metrics(ref_wd)


def test_checkpoint_holds_the_ledger_rng_and_a_model_reference(reference):
  wd, ref = reference
  mgr = checkpoint.Checkpointer(wd, read_only=True)
  meta = mgr.read_meta(mgr.latest())
  assert meta["round"] == 4 and meta["format_version"] == checkpoint.FORMAT_VERSION
  ledger = meta["ledger"]
  [entry] = ledger["entries"]
  assert (entry["name"], ledger["rounds"], entry["segments"][-1]["releases"]) == (
      "example", 4, 8)
  assert entry["epsilon"] == ref["epsilon"]
  assert meta["model"]["fingerprint"].startswith("random:")
  assert set(meta) >= {"host", "config", "ledger"}
  assert set(meta["host"]) >= {"randomness", "sampler", "comm", "rounds_done"}
  assert meta["host"]["randomness"]["reproducible_seed"] == 5
  # frozen base weights are referenced, not saved: the checkpoint is LoRA-sized
  size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(wd, "checkpoints", "4", "**"),
                                                   recursive=True) if os.path.isfile(f))
  assert size < 20 * ref["lora_bytes"] + 200_000
  assert size < ref["full_model_bytes"] / 4
  mgr.close()


def test_tensorboard_events_are_written(reference):
  wd, _ = reference
  scalars = _read_scalars(os.path.join(wd, "tensorboard"))
  assert [s for s, _ in scalars["epsilon"]] == [1, 2, 3, 4]
  assert not any(k.startswith("private_") or "loss" in k for k in scalars)
  assert scalars["epsilon"][-1][1] == pytest.approx(_metrics(wd)[-1]["epsilon"], rel=1e-6)


def _read_scalars(logdir):
  """{tag: [(step, value)]} from TFRecord event files (length, crc, Event proto, crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


@pytest.fixture(scope="module")
def half_run_template(tmp_path_factory):
  """A workdir holding the checkpoint of round 2 of 4 (killed right after saving it)."""
  wd = str(tmp_path_factory.mktemp("half") / "run")
  subprocess.run([sys.executable, "-m", "tests.kill_run", wd, ARG, "2", "after_save"], cwd=ROOT,
                 capture_output=True)
  return wd


def _half_run(tmp_path, template):
  """A fresh copy of the killed run's workdir (each test changes its own)."""
  wd = str(tmp_path / "run")
  shutil.copytree(template, wd)
  return wd


def test_resume_refuses_a_changed_privacy_field_and_accepts_a_changed_cadence(tmp_path,
                                                                            half_run_template):
  wd = _half_run(tmp_path, half_run_template)
  for arg, field in ((ARG + ",eps=4", "dp.target_epsilon"), (ARG + ",rank=2", "lora.rank"),
                     (ARG + ",clients=3", "fed.num_clients"),
                     (ARG.replace("client_rate=0.75", "client_rate=0.5"), "fed.client_rate")):
    with pytest.raises(checkpoint.CheckpointError, match=field.replace(".", r"\.")):
      train.run(_cfg(arg), wd, progress=False)
  c = tiny.get_config(ARG)
  with c.unlocked():
    c.log_every = 2
    c.checkpoint_every = 2
  out = train.run(config_lib.from_config_dict(c), wd, progress=False).summary
  assert out["resumed_from_round"] == 2
  assert [l["round"] for l in _metrics(wd)] == [1, 2, 4]


def test_a_field_added_since_the_checkpoint_counts_at_its_default():
  """A checkpoint written before a field existed (its saved config lacks it) ran with the field's
  default: resuming or exporting it is refused only if the field now differs from that default;
  a saved field the config no longer has is a change."""
  now = config_lib.to_dict(_cfg())
  saved = json.loads(json.dumps(now))
  del saved["dp"]["noise_at"], saved["lora"]["first_layer"]
  assert checkpoint.config_changes(saved, now) == []
  c = tiny.get_config(ARG)
  with c.unlocked():
    c.lora.first_layer = 1
  assert checkpoint.config_changes(saved, config_lib.to_dict(
      config_lib.from_config_dict(c))) == ["lora.first_layer"]
  saved["dp"]["retired_field"] = 1
  assert checkpoint.config_changes(saved, now) == ["dp.retired_field"]
  # the defaults are those of a config that sets nothing
  assert config_lib.defaults()["dp"]["noise_at"] == "client"
  assert config_lib.defaults()["lora"]["first_layer"] == 0


def test_changed_base_model_checksum_is_refused(reference):
  wd, _ = reference
  mgr = checkpoint.Checkpointer(wd, read_only=True)
  meta = mgr.read_meta(4)
  with pytest.raises(checkpoint.CheckpointError, match="the base model changed"):
    checkpoint.check_resumable(meta, _cfg(), fingerprint="0" * 64)
  checkpoint.check_resumable(meta, _cfg(), fingerprint=meta["model"]["fingerprint"])
  mgr.close()


def test_corrupt_checkpoint_is_a_clear_error_and_is_not_deleted(tmp_path, half_run_template):
  wd = _half_run(tmp_path, half_run_template)
  for f in glob.glob(os.path.join(wd, "checkpoints", "2", "state", "**", "d", "*"),
                     recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(3)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 is corrupt"):
    train.run(_cfg(), wd, progress=False)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
  assert os.path.isdir(os.path.join(wd, "checkpoints", "1"))


def test_newer_and_public_seed_formats_are_refused(tmp_path, half_run_template):
  wd = _half_run(tmp_path, half_run_template)
  meta_file = os.path.join(wd, "checkpoints", "2", "meta", "metadata")
  meta = json.load(open(meta_file))
  for version, match in ((99, "format version 99"), (1, "came from the public config seed")):
    meta["format_version"] = version
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(checkpoint.CheckpointError, match=match):
      train.run(_cfg(), wd, progress=False)


def test_workdir_and_checkpoints_are_owner_only(reference):
  """A checkpoint holds the noise root and the samplers: nobody but the owner may read it."""
  wd, _ = reference
  assert stat.S_IMODE(os.stat(wd).st_mode) == 0o700
  seen = 0
  for root, dirs, files in os.walk(os.path.join(wd, "checkpoints")):
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
    for f in files:
      assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
      seen += 1
  assert seen > 5
  for f in ("metrics.jsonl", "summary.json"):
    assert stat.S_IMODE(os.stat(os.path.join(wd, f)).st_mode) == 0o600


def test_unfinished_saves_are_removed_by_a_writer_before_it_returns_and_never_by_a_reader(
    reference):
  # Orbax's own cleanup ran in a background thread that close() did not wait for, so the test
  # above opening a manager, closing it and starting the resumed run raced two deletions of the
  # same files (CI: FileNotFoundError mid-save). Ours is synchronous, and readers never delete.
  wd, _ = reference
  ckdir = pathlib.Path(wd) / "checkpoints"
  finished = sorted(p.name for p in ckdir.iterdir())
  unfinished = ckdir / "3.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
  for i in range(200):
    (unfinished / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
    (unfinished / f"d{i % 7}" / f"f{i}").write_bytes(b"x")
  reader = checkpoint.Checkpointer(wd, read_only=True)
  assert unfinished.exists() and reader.latest() == 4
  reader.close()
  writer = checkpoint.Checkpointer(wd)
  assert sorted(p.name for p in ckdir.iterdir()) == finished
  assert writer.latest() == 4
  writer.close()
