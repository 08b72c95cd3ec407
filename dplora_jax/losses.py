"""The loss on answer tokens, computed only where it is needed.

The classification and QA losses use a few answer tokens per example (1-3 for the sentiment
labels), so the LM head (~21% of SmolLM2's forward FLOPs) and the log-softmax over the vocabulary
run only at those positions: `answer_positions` turns a [T] loss mask into a fixed number P of
positions (static, so shapes stay fixed), and the model is called with `logits_at`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def answer_positions(loss_mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """The first `count` positions where `loss_mask` [..., T] is True, and their validity.

  Returns:
    (positions [..., P] int32, valid [..., P] bool) with P = min(count, T): a row of T tokens
    holds at most T answer positions (a length bucket can be narrower than `count`). Missing
    positions are 0 and invalid (an example with fewer answer tokens than P).
  """
  count = min(count, loss_mask.shape[-1])
  order = jnp.argsort(~loss_mask.astype(bool), axis=-1, stable=True)[..., :count]
  valid = jnp.arange(count) < jnp.sum(loss_mask, axis=-1, keepdims=True)
  return jnp.where(valid, order, 0).astype(jnp.int32), valid


def label_logprob(logits: jax.Array, target: jax.Array, label_tokens: jax.Array) -> jax.Array:
  """log p(target) under the softmax restricted to `label_tokens` [C] of logits [V] (float32);
  0 when `target` is not one of them."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32)[label_tokens], axis=-1)
  return jnp.sum(jnp.where(label_tokens == target, logp, 0.0))


def token_logprob(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) under logits [..., V] (float32).

  logit[target] - logsumexp(logits): no [..., V] log-probabilities are written, and the target's
  logit is picked by a comparison with an iota (its gradient is an elementwise select fused into
  the softmax's, not a scatter into a zero-filled [..., V] buffer)."""
  logits = logits.astype(jnp.float32)
  hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  return picked - jax.nn.logsumexp(logits, axis=-1)
