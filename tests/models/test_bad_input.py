"""Bad model input raises a clear error naming the file or field and what was expected."""

import json
import os

import pytest

from dplora_jax.models import load_model
from tests import hf_fixtures

pytest.importorskip("torch")


def test_missing_path():
  with pytest.raises(FileNotFoundError, match="does not exist; expected a Hugging Face model"):
    load_model("/nonexistent/model")


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    load_model(str(tmp_path))


def test_unreadable_config(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: cannot be read as JSON"):
    load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  with pytest.raises(ValueError, match="model_type='bert' is not supported"):
    load_model(str(tmp_path))


def test_missing_weights_file(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama")
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    load_model(str(tmp_path), with_tokenizer=False)


def _rewrite(path, drop=None, reshape=None):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(path)
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][:, :-1]
  save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama")
  _rewrite(str(tmp_path / "model.safetensors"), drop="model.layers.1.self_attn.k_proj.weight")
  with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
    load_model(str(tmp_path), with_tokenizer=False)


def test_misshaped_tensor(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama")
  _rewrite(str(tmp_path / "model.safetensors"), reshape="model.layers.0.mlp.up_proj.weight")
  with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(96, 63\); expected \(96, 64\)"):
    load_model(str(tmp_path), with_tokenizer=False)


def test_truncated_safetensors(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama")
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:5000])
  with pytest.raises(ValueError, match="model.safetensors"):
    load_model(str(tmp_path), with_tokenizer=False)


def test_corrupt_gguf(tmp_path):
  f = tmp_path / "bad.gguf"
  f.write_bytes(b"GGUF" + os.urandom(64))
  with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
    load_model(str(f))


def test_unknown_extension(tmp_path):
  f = tmp_path / "weights.bin"
  f.write_bytes(b"x")
  with pytest.raises(ValueError, match="expected a model directory"):
    load_model(str(f))
