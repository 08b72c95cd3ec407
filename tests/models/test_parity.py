"""Our logits and greedy generations equal transformers' on the same weights."""

import numpy as np
import pytest

from dplora_jax.generate import generate
from dplora_jax.models import load_model
from tests import hf_fixtures

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # biases on q, k, v, o; gate, up, down
    ("qwen2", {}),
    ("gpt2", {}),
])
def test_logits_match_transformers(tmp_path, kind, overrides):
  ref = hf_fixtures.write_hf(tmp_path, kind, **overrides)
  ours = load_model(str(tmp_path), with_tokenizer=False)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, size=(3, 17)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 12:] = 0  # right padding
  want = hf_fixtures.torch_logits(ref, tokens, mask)
  got = np.asarray(ours.model(tokens, mask))
  valid = mask.astype(bool)
  assert np.abs(got[valid] - want[valid]).max() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_matches_transformers(tmp_path, kind):
  ref = hf_fixtures.write_hf(tmp_path, kind)
  ours = load_model(str(tmp_path), with_tokenizer=False)
  prompt = np.array([5, 17, 42, 9, 100, 3], np.int64)
  with torch.no_grad():
    want = ref.generate(torch.tensor(prompt[None]), max_new_tokens=12, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  [got] = generate(ours.model, [prompt], max_new_tokens=12, eos_id=-1, pad_id=0)
  assert got == want


def test_left_padded_batch_generation_equals_single(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama")
  ours = load_model(str(tmp_path), with_tokenizer=False)
  prompts = [np.array([5, 6, 7, 8, 9]), np.array([11, 12])]
  batch = generate(ours.model, prompts, max_new_tokens=6, eos_id=-1, pad_id=0)
  singles = [generate(ours.model, [p], max_new_tokens=6, eos_id=-1, pad_id=0)[0] for p in prompts]
  assert batch == singles


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
  ref = hf_fixtures.write_hf(tmp_path / "single", "qwen2")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  a = load_model(str(tmp_path / "single"), with_tokenizer=False)
  b = load_model(str(tmp_path / "sharded"), with_tokenizer=False)
  tokens = np.arange(10, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(a.model(tokens)), np.asarray(b.model(tokens)))
  assert a.fingerprint != b.fingerprint  # different files, different identity
