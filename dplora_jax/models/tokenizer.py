"""Tokenizers from local files: a model directory's tokenizer.json, or a GGUF's BPE fields."""

from __future__ import annotations

import os

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Pre-tokenizers of llama.cpp's `tokenizer.ggml.pre` names, as Hugging Face writes them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder"):
    # SmolLM2's tokenizer.json: digits one by one, then GPT-2 byte-level splitting.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("default", "gpt-2", "gpt2"):
    return byte_level
  split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
  if split is None:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                     "smollm, starcoder, gpt-2, default, llama3, llama-bpe, qwen2.")
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf_fields(fields: dict, source: str) -> PreTrainedTokenizerFast:
  """Builds a byte-level BPE tokenizer from GGUF metadata (tokenizer.ggml.*).

  Args:
    fields: GGUF key -> python value (tokens and merges as lists of str).
    source: the file name, for errors.
  """
  kind = fields.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') "
                     "GGUF tokenizers are supported.")
  tokens = list(fields["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
  tok.decoder = decoders.ByteLevel()
  types = fields.get("tokenizer.ggml.token_type")
  if types is not None:
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if int(ty) == 3]  # 3 = CONTROL
    tok.add_special_tokens(control)

  def name(key):
    idx = fields.get(f"tokenizer.ggml.{key}")
    return None if idx is None else tokens[int(idx)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name("bos_token_id"), eos_token=name("eos_token_id"),
      unk_token=name("unknown_token_id"), pad_token=name("padding_token_id") or name("eos_token_id"),
      chat_template=fields.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)


def tokenizer_from_dir(path: str) -> PreTrainedTokenizerFast:
  """Loads tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) from a directory."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found: a model directory needs tokenizer.json.")
  tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def encode(tokenizer, text: str) -> np.ndarray:
  """Token ids of `text` without special tokens added."""
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
