"""GPT-2 in Flax NNX: learned positions, LayerNorm, GELU (tanh), fused c_attn.

Hugging Face stores GPT-2 projections as Conv1D with weight [in, out] (fan_in_fan_out), which is
already our Dense kernel layout. Layers are stacked and scanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dplora_jax.models import layers
from dplora_jax.models.config import ModelConfig

LORA_TARGETS = {
    "c_attn": ("attn", "c_attn"), "attn.c_proj": ("attn", "c_proj"),
    "c_fc": ("mlp", "c_fc"), "mlp.c_proj": ("mlp", "c_proj"),
}
TARGET_ALIASES = {"q": "c_attn", "k": "c_attn", "v": "c_attn", "qkv": "c_attn",
                  "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"}
DEFAULT_LORA_TARGETS = ("c_attn",)
RESIDUAL_TARGETS = ("attn.c_proj", "mlp.c_proj")  # their output is added to the residual stream
HF_MODULE_PATHS = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
                   "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.impl = cfg.attention
    self.c_attn = layers.Dense(d, 3 * d, use_bias=True, **kw)
    self.c_proj = layers.Dense(d, d, use_bias=True, **kw)

  def __call__(self, x, key_mask, query_index, cache):
    b, t, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.num_heads, self.head_dim) for a in (q, k, v))
    if cache is not None:
      k, v = layers.update_cache(cache["k"], cache["v"], k, v, query_index[0])
      cache = {"k": k, "v": v}
    out = layers.attention(q, k, v, key_mask, query_index, self.impl)
    return self.c_proj(out.reshape(b, t, d)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype, rngs=rngs)
    self.c_fc = layers.Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=True, **kw)
    self.c_proj = layers.Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=True, **kw)

  def __call__(self, x):
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, stack: tuple, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype)
    self.ln_1 = layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.attn = Attention(cfg, stack, rngs)
    self.ln_2 = layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
    self.mlp = MLP(cfg, stack, rngs)

  def __call__(self, x, key_mask, query_index, cache):
    h, cache = self.attn(self.ln_1(x), key_mask, query_index, cache)
    x = x + h
    return x + self.mlp(self.ln_2(x)), cache


class GPT2(nnx.Module):
  """GPT-2 LM; same call convention as `Llama` (tokens [B, T], mask [B, T] -> logits)."""

  family = "gpt2"

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.lora_first_layer = 0  # LoRA trains layers >= this one (set by `lora.add_lora`)
    kw = dict(param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype)
    self.wte = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
    self.wpe = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs, **kw)
    self.layers = Block(cfg, (cfg.num_layers,), rngs)
    self.ln_f = layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)

  def init_cache(self, batch: int, length: int) -> dict:
    cfg = self.config
    shape = (cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: dict | None = None,
               cache_mask: jax.Array | None = None, cache_index: jax.Array | int = 0,
               logits_at: jax.Array | None = None, hidden: jax.Array | None = None,
               prefix_only: bool = False, capture_weights: jax.Array | None = None):
    b, t = tokens.shape
    if mask is None:
      mask = jnp.ones((b, t), bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    query_index = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    key_mask = mask.astype(bool) if cache is None else cache_mask.astype(bool)
    # `hidden`: the frozen layers' output (`prefix_only`), cached by the caller: start above it
    x = self.wte(tokens) + self.wpe(positions) if hidden is None else hidden
    part = "below" if prefix_only else ("above" if hidden is not None else "all")

    def layer(block, x, layer_cache):
      return block(x, key_mask, query_index, layer_cache)

    x, new_cache = layers.scan_blocks(self.layers, x, cache, layer, part=part,
                                      remat=self.config.remat,
                                      remat_policy=self.config.remat_policy,
                                      first_trained=self.lora_first_layer,
                                      capture=layers.weighted_token_sum(capture_weights))
    if prefix_only:
      return x
    if capture_weights is not None:
      return new_cache[1]
    if logits_at is not None:  # only these positions reach the head (and the softmax after it)
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    logits = self.wte.attend(self.ln_f(x)).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)
