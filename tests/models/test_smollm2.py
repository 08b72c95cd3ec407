"""SmolLM2-135M-Instruct from the embedded GGUF: logits, generation and tokenizer vs transformers."""

import os

import numpy as np
import pytest

from dplora_jax.generate import generate
from dplora_jax.models import load_model, resolve_path
from dplora_jax.models.tokenizer import encode

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

STRINGS = ["Hello world", "The year 2024 had 366 days; 3.14159 != 22/7.", "  leading  spaces\n\ttab",
           "naïve café — 東京 🚀 ünïcödé", "$AAPL +12.5% after Q3 earnings https://t.co/abc123",
           "<|im_start|>user\nhi<|im_end|>", "a1b22c333 4444 55555", "don't won't I'll"]


@pytest.fixture(scope="module")
def gguf_path():
  return resolve_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def ours():
  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(gguf_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  folder, name = os.path.split(gguf_path)
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  return model.eval(), tok


def test_config(ours):
  c = ours.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
          c.intermediate_size, c.vocab_size, c.tie_embeddings) == (30, 576, 9, 3, 64, 1536,
                                                                   49152, True)
  assert c.rope_theta == 100000.0


def test_tokenizer_ids_match_transformers(ours, reference):
  _, ref_tok = reference
  for s in STRINGS:
    assert encode(ours.tokenizer, s).tolist() == ref_tok(s, add_special_tokens=False)["input_ids"], s
    assert ours.tokenizer.decode(encode(ours.tokenizer, s)) == s


def test_cached_tokenizer_is_the_gguf_tokenizer(reference, tmp_path, monkeypatch):
  """load_tokenizer keeps a GGUF's tokenizer as tokenizer.json; the cached copy must encode,
  decode and name special tokens exactly as transformers' reading of the GGUF."""
  from dplora_jax.models import load_tokenizer
  monkeypatch.setenv("DPLORA_CACHE", str(tmp_path))
  first = load_tokenizer("smollm2-135m-instruct")  # parsed from the GGUF, then cached
  assert len(os.listdir(tmp_path / "tokenizers")) == 1
  cached = load_tokenizer("smollm2-135m-instruct")
  _, ref_tok = reference
  for s in STRINGS:
    want = ref_tok(s, add_special_tokens=False)["input_ids"]
    assert encode(first, s).tolist() == want and encode(cached, s).tolist() == want, s
  for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "chat_template"):
    assert getattr(cached, attr) == getattr(first, attr), attr


def test_logits_and_generation_match_transformers(ours, reference):
  model, ref_tok = reference
  text = ref_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
  ids = encode(ours.tokenizer, text)
  with torch.no_grad():
    want = model(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
    want_gen = model.generate(torch.tensor(ids[None], dtype=torch.long), max_new_tokens=12,
                              do_sample=False)[0, len(ids):].tolist()
  got = np.asarray(ours.model(ids[None]))
  assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
  [gen] = generate(ours.model, [ids], max_new_tokens=12, eos_id=ours.tokenizer.eos_token_id,
                   pad_id=ours.tokenizer.pad_token_id)
  assert gen == want_gen[:len(gen)]
  assert "Paris" in ours.tokenizer.decode(gen)


def test_gguf_slices_read_only_their_rows_and_equal_the_full_load(ours):
  """What a sharded mesh reads (`models.sliced`): slices of the quantised GGUF tensors, q and k
  with llama.cpp's row permutation undone, equal the same elements of the whole-file load."""
  from dplora_jax.models.loading import open_weights
  src = open_weights("smollm2-135m-instruct")
  layers = ours.model.layers
  for name, ours_t in (("model.layers.3.self_attn.q_proj.weight", layers.attn.q.kernel[3]),
                       ("model.layers.3.self_attn.k_proj.weight", layers.attn.k.kernel[3]),
                       ("model.layers.0.mlp.down_proj.weight", layers.mlp.down.kernel[0]),
                       ("model.embed_tokens.weight", ours.model.embed.embedding)):
    whole = np.asarray(ours_t[...])
    whole = whole if name.startswith("model.embed") else whole.T  # HF layout: [out, in]
    rows, cols = whole.shape
    index = (slice(rows // 4, rows // 2), slice(cols // 3, cols))
    before = src.bytes_read
    np.testing.assert_array_equal(src.read(name, index), whole[index])
    assert src.bytes_read - before == 4 * (rows // 2 - rows // 4) * (cols - cols // 3)
