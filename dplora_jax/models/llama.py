"""Llama family in Flax NNX: Llama 1/2/3, Mistral (no sliding window), Qwen2, SmolLM2.

RMSNorm, RoPE (Llama-3 scaling), grouped-query attention, SwiGLU, tied or untied embeddings,
optional q/k/v bias. Layers are stacked and scanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dplora_jax.models import layers
from dplora_jax.models.config import ModelConfig

# LoRA target names this family understands, with Hugging Face / PEFT aliases.
LORA_TARGETS = {
    "q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
    "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down"),
}
TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                  "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
DEFAULT_LORA_TARGETS = ("q", "k", "v")
RESIDUAL_TARGETS = ("o", "down")  # their output is added to the residual stream
# Our name -> Hugging Face module path inside a layer (for PEFT export).
HF_MODULE_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                   "down": "mlp.down_proj"}


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype, rngs=rngs)
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.impl = cfg.attention
    self.q = layers.Dense(d, cfg.num_heads * hd, use_bias=cfg.attention_bias, **kw)
    self.k = layers.Dense(d, cfg.num_kv_heads * hd, use_bias=cfg.attention_bias, **kw)
    self.v = layers.Dense(d, cfg.num_kv_heads * hd, use_bias=cfg.attention_bias, **kw)
    self.o = layers.Dense(cfg.num_heads * hd, d, use_bias=cfg.o_bias, **kw)

  def __call__(self, x, positions, inv_freq, key_mask, query_index, cache):
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    if cache is not None:
      k, v = layers.update_cache(cache["k"], cache["v"], k, v, query_index[0])
      cache = {"k": k, "v": v}
    out = layers.attention(q, k, v, key_mask, query_index, self.impl)
    return self.o(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype, rngs=rngs)
    self.gate = layers.Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, **kw)
    self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, **kw)
    self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=cfg.mlp_bias, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype)
    self.attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.attn = Attention(cfg, stack, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.mlp = MLP(cfg, stack, rngs)

  def __call__(self, x, positions, inv_freq, key_mask, query_index, cache):
    h, cache = self.attn(self.attn_norm(x), positions, inv_freq, key_mask, query_index, cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """Decoder-only Llama-family LM.

  Call with tokens [B, T] int32 and mask [B, T] (1 = real token) to get logits [B, T, V] float32.
  With `cache` (see `init_cache`) it also returns the updated cache (generation). With
  `capture_weights` [B, T] it returns instead, for every LoRA-adapted Dense of the trained layers,
  the weighted sum over tokens of its input ({module path: [L - first_layer, B, in]}).
  """

  family = "llama"

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.lora_first_layer = 0  # LoRA trains layers >= this one (set by `lora.add_lora`)
    kw = dict(param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype)
    self.embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
    self.layers = Block(cfg, (cfg.num_layers,), rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.lm_head = None if cfg.tie_embeddings else layers.Dense(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs, **kw)

  def init_cache(self, batch: int, length: int) -> dict:
    cfg = self.config
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: dict | None = None,
               cache_mask: jax.Array | None = None, cache_index: jax.Array | int = 0,
               logits_at: jax.Array | None = None, hidden: jax.Array | None = None,
               prefix_only: bool = False, capture_weights: jax.Array | None = None):
    cfg = self.config
    b, t = tokens.shape
    if mask is None:
      mask = jnp.ones((b, t), bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    query_index = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    key_mask = mask.astype(bool) if cache is None else cache_mask.astype(bool)
    inv_freq = layers.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def layer(block, x, layer_cache):
      return block(x, positions, inv_freq, key_mask, query_index, layer_cache)

    # `hidden`: the frozen layers' output (`prefix_only`), cached by the caller: start above it
    x = self.embed(tokens) if hidden is None else hidden
    part = "below" if prefix_only else ("above" if hidden is not None else "all")
    x, new_cache = layers.scan_blocks(self.layers, x, cache, layer, part=part, remat=cfg.remat,
                                      remat_policy=cfg.remat_policy,
                                      first_trained=self.lora_first_layer,
                                      capture=layers.weighted_token_sum(capture_weights))
    if prefix_only:
      return x
    if capture_weights is not None:
      return new_cache[1]
    if logits_at is not None:  # only these positions reach the head (and the softmax after it)
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = self.norm(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)
