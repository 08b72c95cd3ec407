"""Text classification as causal-LM instruction data (FinGPT-style prompts).

Each example becomes `prompt(text) + " " + label_word`; the loss covers the label tokens only.
Arrays are fixed length (right-padded) so nothing recompiles.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np

from dplora_jax.models.tokenizer import encode

def packaged(name: str) -> str:
  """Path of a file shipped with the package, e.g. 'tfns/train.jsonl'."""
  return os.path.join(os.path.dirname(__file__), name)


def read_records(path: str) -> list[dict]:
  """Reads .jsonl, .json (a list) or .csv records.

  Raises:
    FileNotFoundError / ValueError naming the file (and line for jsonl).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} not found.")
  if path.endswith(".jsonl"):
    out = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e}).") from e
    return out
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      return list(json.load(f))
  if path.endswith(".csv"):
    with open(path, encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f))
  raise ValueError(f"data file {path!r}: expected .jsonl, .json or .csv.")


@dataclasses.dataclass
class Examples:
  """Fixed-length training/eval arrays.

  Attributes:
    tokens: [N, T] int32 inputs (right-padded).
    mask: [N, T] bool, real tokens.
    targets: [N, T] int32, tokens shifted left (next-token targets).
    loss_mask: [N, T] bool, True where targets[i, t] is a label token.
    labels: [N] int32 label ids.
    prompt_len: [N] int32, tokens before the label (the label's first token is predicted at
      position prompt_len - 1).
  """
  tokens: np.ndarray
  mask: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  labels: np.ndarray
  prompt_len: np.ndarray

  def __len__(self):
    return len(self.labels)

  def subset(self, idx) -> "Examples":
    idx = np.asarray(idx)
    return Examples(self.tokens[idx], self.mask[idx], self.targets[idx], self.loss_mask[idx],
                    self.labels[idx], self.prompt_len[idx])


def concat(parts: list[Examples]) -> Examples:
  """Rows of several Examples (same max_length) in order."""
  cat = lambda f: np.concatenate([getattr(p, f) for p in parts])
  return Examples(cat("tokens"), cat("mask"), cat("targets"), cat("loss_mask"), cat("labels"),
                  cat("prompt_len"))


def label_id(value, labels: tuple[str, ...], source: str, i: int) -> int:
  """A record's label as an id: a label word, or an integer (or digit string) in range.

  Raises:
    ValueError: naming the record, the bad label and the allowed ones.
  """
  if isinstance(value, str) and not value.lstrip("-").isdigit():
    if value not in labels:
      raise ValueError(f"{source}: record {i} has label {value!r}; expected one of {labels}.")
    return labels.index(value)
  lab = int(value)
  if not 0 <= lab < len(labels):
    raise ValueError(f"{source}: record {i} has label {lab}; expected 0..{len(labels) - 1}.")
  return lab


def label_token_ids(tokenizer, labels) -> list[np.ndarray]:
  """Token ids of " label" for each label word."""
  return [encode(tokenizer, " " + w) for w in labels]


def build_examples(records: list[dict], tokenizer, *, labels: tuple[str, ...], prompt: str,
                   max_length: int, source: str = "data") -> Examples:
  """Tokenizes records {text, label} into fixed-length arrays.

  The text is truncated (never the instruction or the answer) to fit `max_length`.

  Raises:
    ValueError: missing fields, empty text, unknown label, or a prompt that cannot fit.
  """
  head, tail = prompt.split("{text}", 1)
  head_ids, tail_ids = encode(tokenizer, head), encode(tokenizer, tail)
  answers = label_token_ids(tokenizer, labels)
  longest = max(len(a) for a in answers)
  room = max_length - len(head_ids) - len(tail_ids) - longest
  if room < 1:
    raise ValueError(f"data.max_length={max_length} leaves no room for the text: the prompt "
                     f"takes {len(head_ids) + len(tail_ids)} tokens and answers up to {longest}.")
  n = len(records)
  pad = tokenizer.pad_token_id
  tokens = np.full((n, max_length), pad, np.int32)
  mask = np.zeros((n, max_length), bool)
  loss_mask = np.zeros((n, max_length), bool)
  label_ids = np.zeros((n,), np.int32)
  prompt_len = np.zeros((n,), np.int32)
  for i, r in enumerate(records):
    for key in ("text", "label"):
      if key not in r:
        raise ValueError(f"{source}: record {i} has no field {key!r} (fields: {sorted(r)}).")
    text = str(r["text"])
    if not text.strip():
      raise ValueError(f"{source}: record {i} has an empty text.")
    lab = label_id(r["label"], labels, source, i)
    body = encode(tokenizer, text)[:room]
    p = np.concatenate([head_ids, body, tail_ids])
    seq = np.concatenate([p, answers[lab]])
    tokens[i, :len(seq)] = seq
    mask[i, :len(seq)] = True
    # target at position t is token t+1; label tokens are targets at len(p)-1 .. len(seq)-2
    loss_mask[i, len(p) - 1:len(seq) - 1] = True
    label_ids[i] = lab
    prompt_len[i] = len(p)
  targets = np.concatenate([tokens[:, 1:], np.full((n, 1), pad, np.int32)], axis=1)
  return Examples(tokens, mask, targets, loss_mask, label_ids, prompt_len)
