"""Small random Hugging Face checkpoints written with transformers' save_pretrained (torch, CPU)."""

import os

import numpy as np

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0)


def _tokenizer(path):
  """A tiny byte-level BPE tokenizer.json so that directories are complete."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(alphabet))}
  vocab["<eos>"] = len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
  fast.save_pretrained(path)


def write_hf(path, kind="llama", seed=0, tokenizer=False, **overrides):
  """Writes a random checkpoint of `kind` (llama, qwen2, gpt2) to `path`; returns the torch model."""
  import torch
  import transformers

  torch.manual_seed(seed)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True, **overrides})
    model = transformers.LlamaForCausalLM(cfg)
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(**{**TINY_LLAMA, "tie_word_embeddings": False, **overrides})
    model = transformers.Qwen2ForCausalLM(cfg)
  elif kind == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  **overrides)
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    raise ValueError(kind)
  # Random init leaves biases and norms at 0/1; perturb everything so the parity test sees them.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.eval()
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  if tokenizer:
    _tokenizer(path)
  return model


def torch_logits(model, tokens, mask=None):
  import torch

  with torch.no_grad():
    t = torch.tensor(np.asarray(tokens), dtype=torch.long)
    m = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
    return model(input_ids=t, attention_mask=m).logits.float().numpy()
