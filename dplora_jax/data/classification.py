"""Text classification as causal-LM instruction data (FinGPT-style prompts).

Each example becomes `prompt(text) + " " + label_word`; the loss covers the label tokens only.
Arrays are fixed length (right-padded) so nothing recompiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dplora_jax.models.tokenizer import encode

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


def label_id(value, labels: tuple[str, ...], source: str, i: int | None = None) -> int:
  """A record's label as an id: a label word, or an integer (or digit string) in range.

  `source` names the record ("file:line"), or the file with `i` its index.

  Raises:
    ValueError: naming the record, the bad label and the allowed ones.
  """
  where = source if i is None else f"{source}: record {i}"
  if isinstance(value, bool) or value is None or isinstance(value, (list, dict, float)):
    raise ValueError(f"{where}: label {value!r}; expected one of {labels} or 0..{len(labels) - 1}.")
  if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
    word = value.strip()
    if word not in labels:
      raise ValueError(f"{where}: label {value!r}; expected one of {labels}.")
    return labels.index(word)
  lab = int(value)
  if not 0 <= lab < len(labels):
    raise ValueError(f"{where}: label {lab}; expected 0..{len(labels) - 1} ({labels}).")
  return lab


def label_token_ids(tokenizer, labels) -> list[np.ndarray]:
  """Token ids of " label" for each label word."""
  return [encode(tokenizer, " " + w) for w in labels]


def pack(prompts: list[np.ndarray], answers: list[np.ndarray], labels, max_length: int,
         pad: int) -> Examples:
  """Fixed-length rows `prompt + answer`; the loss covers the answer tokens only.

  Each prompt + answer must already fit in `max_length` (the tasks truncate the prompt's body).
  """
  n = len(prompts)
  tokens = np.full((n, max_length), pad, np.int32)
  mask = np.zeros((n, max_length), bool)
  loss_mask = np.zeros((n, max_length), bool)
  prompt_len = np.zeros((n,), np.int32)
  for i, (p, a) in enumerate(zip(prompts, answers)):
    seq = np.concatenate([p, a])
    assert len(seq) <= max_length and len(p) >= 1 and len(a) >= 1, (len(p), len(a))
    tokens[i, :len(seq)] = seq
    mask[i, :len(seq)] = True
    # target at position t is token t+1; answer tokens are targets at len(p)-1 .. len(seq)-2
    loss_mask[i, len(p) - 1:len(seq) - 1] = True
    prompt_len[i] = len(p)
  targets = np.concatenate([tokens[:, 1:], np.full((n, 1), pad, np.int32)], axis=1)
  return Examples(tokens, mask, targets, loss_mask, np.asarray(labels, np.int32).reshape(n),
                  prompt_len)


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
  where = getattr(records, "where", lambda i: f"{source}: record {i}")
  prompts, label_ids = [], []
  for i, r in enumerate(records):
    for key in ("text", "label"):
      if key not in r:
        raise ValueError(f"{where(i)}: no field {key!r} (fields: {sorted(r)}).")
    text = str(r["text"])
    if not text.strip():
      raise ValueError(f"{where(i)}: empty field 'text'.")
    label_ids.append(label_id(r["label"], labels, where(i), None))
    prompts.append(np.concatenate([head_ids, encode(tokenizer, text)[:room], tail_ids]))
  return pack(prompts, [answers[l] for l in label_ids], label_ids, max_length,
              tokenizer.pad_token_id)
