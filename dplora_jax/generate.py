"""Autoregressive generation with a KV cache, compiled as one program (prefill + scan of steps)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def left_pad(prompts: list[np.ndarray], pad_id: int,
             width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into tokens [B, P] int32 and mask [B, P] bool (P = the longest
  prompt, or `width` when larger: a fixed width compiles once for many batches)."""
  width = max(width, max(len(p) for p in prompts))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p):] = p
      mask[i, width - len(p):] = True
  return tokens, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _generate(graphdef, state, tokens, mask, key, temperature, *, max_new_tokens, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  cache = model.init_cache(b, p + max_new_tokens)
  cache_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), bool)], axis=1)
  logits, cache = model(tokens, mask, cache=cache, cache_mask=cache_mask, cache_index=0)
  lengths = mask.sum(axis=1).astype(jnp.int32)

  def pick(logits_last, k):
    greedy = jnp.argmax(logits_last, axis=-1)
    sampled = jax.random.categorical(k, logits_last / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

  def step(carry, i):
    cache, cache_mask, last_logits, lengths, done = carry
    tok = pick(last_logits, jax.random.fold_in(key, i))
    tok = jnp.where(done, pad_id, tok)
    done = done | (tok == eos_id)
    cache_mask = cache_mask.at[:, p + i].set(True)
    logits, cache = model(tok[:, None], jnp.ones((b, 1), bool), positions=lengths[:, None],
                          cache=cache, cache_mask=cache_mask, cache_index=p + i)
    return (cache, cache_mask, logits[:, -1], lengths + 1, done), tok

  init = (cache, cache_mask, logits[:, -1], lengths, jnp.zeros((b,), bool))
  _, out = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return out.T  # [B, max_new_tokens]


def generate(model: nnx.Module, prompts: list[np.ndarray], *, max_new_tokens: int, eos_id: int,
             pad_id: int, temperature: float = 0.0, seed: int = 0,
             width: int = 0) -> list[list[int]]:
  """Generates up to `max_new_tokens` after each prompt (greedy when temperature == 0).

  Args:
    model: an NNX LM (with or without LoRA).
    prompts: token id arrays (different lengths are left-padded).
    eos_id: generation of a row stops after this token (it is included in the output).
    pad_id: fills prompt padding and finished rows.
    width: left-pad prompts to at least this many tokens (fixed shapes: one compile).

  Returns:
    The new token ids per prompt, ending at eos if it was produced.
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens}; expected > 0.")
  tokens, mask = left_pad(prompts, pad_id, width)
  graphdef, state = nnx.split(model)
  out = np.asarray(_generate(graphdef, state, tokens, mask, jax.random.key(seed),
                             jnp.float32(temperature), max_new_tokens=max_new_tokens,
                             eos_id=int(eos_id), pad_id=int(pad_id)))
  result = []
  for row in out:
    ids = []
    for t in row:
      ids.append(int(t))
      if t == eos_id:
        break
    result.append(ids)
  return result
