"""Log-likelihood scoring of answers after prompts: batched, fixed shapes, length-bucketed.

Rows are sorted by length and each batch runs at the shortest of a few widths that holds it (and
the LM head at the fewest positions that hold its answers), so evaluation pays for no padding
beyond the bucket and compiles at most a handful of shapes. Batches are padded to a fixed size.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dplora_jax import lora as lora_lib, losses
from dplora_jax.data.classification import Examples


class ModelParts(NamedTuple):
  """A model split for jitted evaluation: static graph, LoRA tree, frozen tree."""
  graphdef: Any
  lora: Any
  frozen: Any


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_logprobs(graphdef, lora, frozen, tokens, mask, prompt_len, candidates):
  """[B, K] log p(candidates[b, k] | row b's first prompt_len[b] tokens): the head runs at the
  last prompt position only."""
  last = lora_lib.apply(graphdef, lora, frozen, tokens, mask, (prompt_len - 1)[:, None])[:, 0]
  return losses.token_logprob(last[:, None, :], candidates)


@functools.partial(jax.jit, static_argnames=("graphdef", "positions"))
def sequence_logprob(graphdef, lora, frozen, tokens, mask, targets, loss_mask, positions=0):
  """[B] sum of log p(target) over loss positions; `positions` = P > 0 runs the head at the
  first P loss positions of each row only (rows must have at most P), 0 at all positions."""
  if positions:
    pos, valid = losses.answer_positions(loss_mask, positions)
    logits = lora_lib.apply(graphdef, lora, frozen, tokens, mask, pos)
    logp = losses.token_logprob(logits, jnp.take_along_axis(targets, pos, axis=1))
    return jnp.sum(jnp.where(valid, logp, 0.0), axis=-1)
  logp = losses.token_logprob(lora_lib.apply(graphdef, lora, frozen, tokens, mask), targets)
  return jnp.sum(jnp.where(loss_mask, logp, 0.0), axis=-1)


def width_bucket(n: int, max_length: int) -> int:
  """The compute width for rows of up to n tokens: the next multiple of 16 of the form 16 * 2^k
  or 3 * 16 * 2^k (16, 32, 48, 64, 96, 128, 192, ...), at most max_length."""
  k = 0
  while _width_step(k) < min(n, max_length):
    k += 1
  return min(_width_step(k), max_length)


def _width_step(k: int) -> int:  # 16, 32, 48, 64, 96, 128, 192, 256, ...
  if k == 0:
    return 16
  return (32 << ((k - 1) // 2)) * (3 if k % 2 == 0 else 2) // 2


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _batches(lengths: np.ndarray, batch_size: int):
  order = np.argsort(-lengths, kind="stable")
  for s in range(0, len(order), batch_size):
    yield order[s:s + batch_size]


def _pad_rows(idx: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([idx, np.full(batch_size - len(idx), idx[0])]).astype(int)


def continuation_logprobs(parts: ModelParts, requests: list[tuple[np.ndarray, np.ndarray]],
                          pad: int, max_length: int, batch_size: int = 32) -> np.ndarray:
  """[N] log p(continuation | context) for (context ids, continuation ids) pairs.

  A pair longer than `max_length` loses context tokens from the left (the continuation is kept;
  it must be shorter than max_length).
  """
  n = len(requests)
  if n == 0:
    return np.zeros((0,), np.float64)
  rows, conts = [], []
  for ctx, cont in requests:
    if len(cont) < 1 or len(cont) >= max_length:
      raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length "
                       f"{max_length}.")
    keep = max_length - len(cont)
    ctx = ctx[-keep:] if len(ctx) > keep else ctx
    if len(ctx) < 1:
      raise ValueError("an empty context: the first continuation token has no prediction.")
    rows.append(np.concatenate([ctx, cont]).astype(np.int32))
    conts.append(len(cont))
  lengths, conts = np.asarray([len(r) for r in rows]), np.asarray(conts)
  out = np.zeros((n,), np.float64)
  one = np.flatnonzero(conts == 1)
  if len(one):
    out[one] = _one_token_logprobs(parts, [rows[i] for i in one], pad, max_length, batch_size)
  many = np.flatnonzero(conts > 1)
  for at in _batches(lengths[many], batch_size):
    idx = many[at]
    width = width_bucket(int(lengths[idx].max()), max_length)
    p = min(_pow2(int(conts[idx].max())), width)
    full = _pad_rows(idx, batch_size)
    tokens = np.full((batch_size, width), pad, np.int32)
    for j, i in enumerate(full):
      tokens[j, :lengths[i]] = rows[i]
    col = np.arange(width)[None]
    mask = col < lengths[full][:, None]
    targets = np.concatenate([tokens[:, 1:], np.full((batch_size, 1), pad, np.int32)], axis=1)
    start = (lengths[full] - conts[full] - 1)[:, None]
    loss_mask = (col >= start) & (col < (lengths[full] - 1)[:, None])
    lp = sequence_logprob(parts.graphdef, parts.lora, parts.frozen, tokens, mask, targets,
                          loss_mask, positions=p)
    out[idx] = np.asarray(lp)[:len(idx)]
  return out


def _one_token_logprobs(parts: ModelParts, rows: list[np.ndarray], pad: int, max_length: int,
                        batch_size: int) -> np.ndarray:
  """[len(rows)] log p(last token | the tokens before it), one forward per distinct context:
  the choices of a BoolQ item (" no" / " yes") or the label words after a prompt share it, so it
  runs once and the head's log-softmax at its last position is read at every choice."""
  groups: dict[bytes, list[tuple[int, int]]] = {}
  for w, r in enumerate(rows):
    groups.setdefault(r[:-1].tobytes(), []).append((w, int(r[-1])))
  ctxs = [np.frombuffer(k, np.int32) for k in groups]
  members = list(groups.values())
  k = _pow2(max(len(m) for m in members))
  lengths = np.asarray([len(c) for c in ctxs])
  out = np.zeros((len(rows),), np.float64)
  for idx in _batches(lengths, batch_size):
    width = width_bucket(int(lengths[idx].max()), max_length)
    full = _pad_rows(idx, batch_size)
    tokens = np.full((batch_size, width), pad, np.int32)
    cand = np.zeros((batch_size, k), np.int32)
    for j, i in enumerate(full):
      tokens[j, :lengths[i]] = ctxs[i]
      toks = [t for _, t in members[i]]
      cand[j] = toks + toks[:1] * (k - len(toks))
    mask = np.arange(width)[None] < lengths[full][:, None]
    lp = np.asarray(_next_token_logprobs(parts.graphdef, parts.lora, parts.frozen, tokens, mask,
                                         lengths[full], cand))
    for j, i in enumerate(idx):
      for c, (w, _) in enumerate(members[i]):
        out[w] = lp[j, c]
  return out


def label_scores(parts: ModelParts, ex: Examples, answers: list[np.ndarray], pad: int,
                 batch_size: int = 32) -> np.ndarray:
  """[N, num_labels] log p(label | prompt) for the prompts of `ex` (their answers are ignored):
  each prompt runs once, the head at its last position, for the labels of one token (the
  others are scored as continuations)."""
  n, max_length = len(ex), ex.tokens.shape[1]
  reqs = [(ex.tokens[i, :ex.prompt_len[i]], a) for i in range(n) for a in answers]
  return continuation_logprobs(parts, reqs, pad, max_length, batch_size).reshape(
      n, len(answers))
