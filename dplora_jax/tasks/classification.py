"""Classification by the log-likelihood of each label word after the prompt (FinGPT style)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dplora_jax import lora as lora_lib, losses
from dplora_jax.data.classification import Examples


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _label_logprobs_single(graphdef, lora, frozen, tokens, mask, prompt_len, label_tokens):
  # the head runs at the last prompt position only
  last = lora_lib.apply(graphdef, lora, frozen, tokens, mask, (prompt_len - 1)[:, None])[:, 0]
  return jax.nn.log_softmax(last, axis=-1)[:, label_tokens]  # [B, num_labels]


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


def _with_answer(ex: Examples, answer: np.ndarray, pad: int):
  n, t = ex.tokens.shape
  tokens = np.where(np.arange(t)[None] < ex.prompt_len[:, None], ex.tokens, pad)
  mask = np.arange(t)[None] < (ex.prompt_len + len(answer))[:, None]
  rows = np.arange(n)[:, None]
  cols = ex.prompt_len[:, None] + np.arange(len(answer))[None]
  tokens[rows, cols] = answer[None]
  targets = np.concatenate([tokens[:, 1:], np.full((n, 1), pad)], axis=1)
  loss_mask = (np.arange(t)[None] >= (ex.prompt_len - 1)[:, None]) & \
              (np.arange(t)[None] < (ex.prompt_len - 1 + len(answer))[:, None])
  return tokens.astype(np.int32), mask, targets.astype(np.int32), loss_mask


def label_scores(graphdef, lora, frozen, ex: Examples, answers: list[np.ndarray], pad: int,
                 batch_size: int = 16) -> np.ndarray:
  """[N, num_labels] log p(label | prompt). One forward per batch when every label is one token."""
  n = len(ex)
  out = []
  for s in range(0, n, batch_size):
    sl = slice(s, min(n, s + batch_size))
    sub = ex.subset(np.arange(n)[sl])
    # pad the last batch to a fixed shape so nothing recompiles
    pad_rows = batch_size - len(sub)
    sub = sub.subset(np.concatenate([np.arange(len(sub)), np.zeros(pad_rows, int)]))
    if all(len(a) == 1 for a in answers):
      lt = jnp.asarray([int(a[0]) for a in answers])
      scores = _label_logprobs_single(graphdef, lora, frozen, sub.tokens, sub.mask,
                                      sub.prompt_len, lt)
    else:
      scores = jnp.stack([sequence_logprob(graphdef, lora, frozen, *_with_answer(sub, a, pad),
                                           positions=len(a)) for a in answers], axis=1)
    out.append(np.asarray(scores)[:batch_size - pad_rows])
  return np.concatenate(out) if out else np.zeros((0, len(answers)))


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
  """Accuracy and macro / weighted F1."""
  f1s, support = [], []
  for c in range(num_labels):
    tp = np.sum((pred == c) & (labels == c))
    fp = np.sum((pred == c) & (labels != c))
    fn = np.sum((pred != c) & (labels == c))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    support.append(np.sum(labels == c))
  support = np.asarray(support, float)
  return {"accuracy": float(np.mean(pred == labels)) if len(labels) else 0.0,
          "f1_macro": float(np.mean(f1s)),
          "f1_weighted": float(np.sum(np.asarray(f1s) * support) / max(support.sum(), 1)),
          "n": int(len(labels))}


def evaluate(graphdef, lora, frozen, ex: Examples, answers, pad: int, num_labels: int) -> dict:
  scores = label_scores(graphdef, lora, frozen, ex, answers, pad)
  return classification_metrics(np.argmax(scores, axis=1), ex.labels, num_labels)
