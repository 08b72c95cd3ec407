"""One run over 2 processes x 4 CPU devices (real processes on 127.0.0.1, JAX's multi-controller
runtime over gloo, started by launch/local_multiprocess.sh) equals 1 process x 8 devices bitwise
with `mesh.ordered_aggregation`: every client's update is summed in client order, and every
process gets the intra-op thread pool of a one-process run (`distributed.cpu_pool_size`; XLA:CPU
splits some reductions by the pool's size: with its default, a 4-device process and an 8-device
one differed by an ulp in the clients' own updates). Without the ordered sum the psum's order
differs (tests/federated/test_mesh.py, and the fsdp run below: <= 1e-6).

The 2-process run draws its DP randomness from OS entropy (the default). Replayed in this process
(8 fake devices) with that run's root, read from its checkpoint, the one-process run gives the
same rounds: had process 1 sampled or noised its clients from its own root (the silent divergence
`distributed.share_root` prevents), it would not. A 2-process checkpoint resumes in one process
with bitwise the same continuation; a forced root mismatch is caught by the cross-process check
and stops the run with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dplora_jax import checkpoint as ckpt_lib, config_files, distributed, export, train
from dplora_jax import lora as lora_lib

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/tiny.py:clients=8,rounds=2,ckpt_every=1"
ORDERED = {"mesh.ordered_aggregation": "True"}


def _launch(workdir, log_dir, extra_env=None, timeout=300):
  # the same matmul precision as this process (tests/conftest.py)
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir),
             JAX_DEFAULT_MATMUL_PRECISION="highest", **(extra_env or {}))
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "4", "-m",
         "launch.train", "--config", SPEC, "--config.mesh.ordered_aggregation=True",
         "--workdir", str(workdir), "--quiet"]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, start_new_session=True)
  try:
    out, _ = p.communicate(timeout=timeout)
  finally:  # the launcher and every process it started
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  return p.returncode, out


def _lora(workdir):
  model, *_ = export.load_trained(str(workdir))
  return [np.asarray(x) for x in jax.tree.leaves(lora_lib.split(model)[1])]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  rc, out = _launch(root / "run", root / "logs")
  assert rc == 0, out[-3000:]
  return root, out


def test_two_processes_equal_one_and_share_one_secret_root(two_processes):
  root, out = two_processes
  wd = root / "run"
  summary = json.load(open(wd / "summary.json"))
  assert summary["processes"] == 2 and summary["devices"] == 8
  assert summary["dp_randomness"] == "os-entropy"
  # process 0 alone wrote what the run releases; process 1 only logged
  assert len(open(wd / "metrics.jsonl").read().splitlines()) == 2
  assert "DP federated LoRA" not in open(root / "logs" / "process_1.log").read()
  # the run's root (secret, in the owner-only checkpoint), replayed here in one process
  ckpt = ckpt_lib.Checkpointer(str(wd), read_only=True)
  meta = ckpt.read_meta(2)
  ckpt.close()
  seed = int(meta["host"]["randomness"]["root"], 16)
  cfg = config_files.load_with_overrides(SPEC, dict(ORDERED, **{"dp.reproducible_seed": str(seed)}))
  one = train.run(cfg, str(root / "one"), progress=False)
  assert one.summary["devices"] == 8 and one.summary["processes"] == 1
  assert one.summary["epsilon"] == summary["epsilon"]
  for a, b in zip(_lora(wd), [np.asarray(x) for x in jax.tree.leaves(one.lora)]):
    np.testing.assert_array_equal(a, b)  # two rounds, bitwise


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes):
  """Round 2 resumed in one process from the 2-process run's round-1 checkpoint: bitwise with the
  ordered aggregation; <= 1e-7 with the psum (`mesh.*` is execution-only: a resume may change
  it)."""
  root, _ = two_processes
  want = _lora(root / "run")
  for name, fields, atol in (("ordered", ORDERED, 0.0), ("psum", {}, 1e-7)):
    wd = root / f"resumed_{name}"
    shutil.copytree(root / "run", wd)
    shutil.rmtree(wd / "checkpoints" / "2")
    os.remove(wd / "summary.json")
    res = train.run(config_files.load_with_overrides(SPEC, fields), str(wd), progress=False)
    assert res.summary["resumed_from_round"] == 1 and res.summary["processes"] == 1
    for a, b in zip(want, [np.asarray(x) for x in jax.tree.leaves(res.lora)]):
      np.testing.assert_allclose(b, a, atol=atol, rtol=0, err_msg=name)


def test_a_forced_root_mismatch_is_caught(tmp_path):
  rc, out = _launch(tmp_path / "run", tmp_path / "logs",
                    {distributed.ENV_UNSAFE_UNSHARED: "1"})
  assert rc == 2, out[-3000:]
  assert "error: the DP randomness root differs between processes" in out
  assert "Traceback" not in out
  assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_runtime_settings_from_the_environment():
  assert distributed.settings_from_env({}) is None
  env = {distributed.ENV_COORDINATOR: "127.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "2",
         distributed.ENV_PROCESS_ID: "1", distributed.ENV_LOCAL_DEVICES: "4"}
  assert distributed.settings_from_env(env) == {"coordinator": "127.0.0.1:1234",
                                                "num_processes": 2, "process_id": 1,
                                                "local_devices": 4}
  with pytest.raises(ValueError, match="DPLORA_PROCESS_ID not set"):
    distributed.settings_from_env({distributed.ENV_COORDINATOR: "h:1",
                                   distributed.ENV_NUM_PROCESSES: "2"})
  with pytest.raises(ValueError, match="outside"):
    distributed.settings_from_env(dict(env, **{distributed.ENV_PROCESS_ID: "2"}))
  with pytest.raises(ValueError, match="not an integer"):
    distributed.settings_from_env(dict(env, **{distributed.ENV_NUM_PROCESSES: "two"}))


def test_weights_split_across_processes_are_read_by_halves(tmp_path_factory, tmp_path):
  """fsdp = 4 over 2 processes x 2 devices: each process reads from the checkpoint only the
  quarters its two devices hold (half the model), evaluation runs on the sharded weights in
  both processes, and the round equals the one-process run that loads the model whole."""
  from dplora_jax.models import load_tokenizer
  from tests import hf_fixtures
  model_dir = str(tmp_path_factory.mktemp("hf_llama"))
  hf_fixtures.write_hf(model_dir, vocab_size=49152)
  load_tokenizer("smollm2-135m-instruct").save_pretrained(model_dir)
  spec = "configs/tiny.py:clients=4,rounds=1,dp_seed=5"
  fields = {"model.random_init": "False", "model.path": model_dir, "data.eval_examples": "8"}
  flags = [f"--config.{k}={v}" for k, v in dict(fields, **{"mesh.fsdp": "4"}).items()]
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"),
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "2", "-m",
         "launch.train", "--config", spec, *flags, "--workdir", str(tmp_path / "run")]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, start_new_session=True)
  try:
    out, _ = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  assert p.returncode == 0, out[-3000:]
  logs = out + open(tmp_path / "logs" / "process_1.log").read()
  import re
  read = re.findall(r"\[process (\d)\] frozen weights read by slices: ([\d.]+) MiB of ([\d.]+) MiB",
                    logs)
  assert sorted(r[0] for r in read) == ["0", "1"], logs[-3000:]
  for _, got, total in read:
    assert abs(float(got) - float(total) / 2) < 0.02, read  # norms are whole: a few KiB more
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  one = train.run(config_files.load_with_overrides(spec, fields), str(tmp_path / "one"),
                  progress=False)
  for a, b in zip(_lora(tmp_path / "run"), [np.asarray(x) for x in jax.tree.leaves(one.lora)]):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert summary["eval"]["after"]["accuracy"] == one.summary["eval"]["after"]["accuracy"]
