"""Building blocks shared by the model families.

Blocks are created *stacked*: every parameter of a block carries a leading layer axis [L, ...].
`scan_blocks` slices that axis inside `jax.lax.scan`, so a block's `__call__` is written for one
layer and compile time does not grow with depth.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any


class LoRAParam(nnx.Param):
  """A trainable LoRA factor. The only variable type that is differentiated and sent."""


class FrozenLoRAParam(nnx.Variable):
  """A LoRA factor kept at its initial value (A under FFA-LoRA): part of the adapter, never trained."""


class LoRACentre(nnx.Variable):
  """The centre c [L, in] of a centred LoRA layer (delta y = s (x - c) A B): a DP release of the
  mean of the layer's input, set once before training (`dplora_jax.federated.centre`); never
  differentiated, never sent by a client."""


class _Capture:
  """The inputs of the adapted Dense layers called while it is active, each reduced at once."""

  def __init__(self, reduce: Callable[[jax.Array], jax.Array]):
    self.reduce = reduce
    self.items: list[tuple[nnx.Module, jax.Array]] = []


_CAPTURES: list[_Capture] = []


@contextlib.contextmanager
def capture_lora_inputs(reduce: Callable[[jax.Array], jax.Array]):
  """Within the block, every Dense that carries LoRA factors records `reduce(its input)` (one
  trace; `scan_blocks(capture=...)` returns them as per-layer outputs)."""
  capture = _Capture(reduce)
  _CAPTURES.append(capture)
  try:
    yield capture
  finally:
    _CAPTURES.pop()


def _normal(key, shape, dtype, std=0.02):
  return (std * jax.random.normal(key, shape)).astype(dtype)


class Dense(nnx.Module):
  """y = x W (+ b) (+ scaling * (x A) B). Kernel layout [in, out] (Flax), optionally stacked.

  LoRA factors are attached by `dplora_jax.lora.add_lora` as attributes `lora_a` [in, r] and
  `lora_b` [r, out] with the float `lora_scaling`; a centred LoRA (`lora.centre`) also has
  `lora_centre` [in] and computes scaling * ((x - c) A) B.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, stack: tuple = (),
               param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.kernel = nnx.Param(_normal(rngs.params(), (*stack, in_features, out_features),
                                    param_dtype))
    self.bias = nnx.Param(jnp.zeros((*stack, out_features), param_dtype)) if use_bias else None
    self.lora_a = nnx.data(None)  # data attributes: filled by add_lora
    self.lora_b = nnx.data(None)
    self.lora_centre = nnx.data(None)
    self.lora_scaling = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      if _CAPTURES:
        _CAPTURES[-1].items.append((self, _CAPTURES[-1].reduce(x)))
      a = self.lora_a[...].astype(self.dtype)
      b = self.lora_b[...].astype(self.dtype)
      xc = x if self.lora_centre is None else x - self.lora_centre[...].astype(self.dtype)
      y = y + ((xc @ a) @ b) * jnp.asarray(self.lora_scaling, self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, D]; `attend` gives tied-embedding logits."""

  def __init__(self, num: int, features: int, *, param_dtype=jnp.float32, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(_normal(rngs.params(), (num, features), param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class RMSNorm(nnx.Module):
  def __init__(self, features: int, eps: float, *, stack: tuple = (), param_dtype=jnp.float32,
               dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((*stack, features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, features: int, eps: float, *, stack: tuple = (), param_dtype=jnp.float32,
               dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((*stack, features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((*stack, features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2], with Llama-3 rope scaling (dict or pairs) when given."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv
  scaling = dict(scaling)
  factor = scaling["factor"]
  low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
  old_len = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in Hugging Face's rotate_half layout.

  Args:
    x: [batch, seq, heads, head_dim].
    positions: [batch, seq] int.
    inv_freq: [head_dim // 2].
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


ATTENTION_IMPLS = ("einsum", "dot_product")
REMAT_POLICIES = {"nothing": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable"}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
              query_index: jax.Array, impl: str = "einsum") -> jax.Array:
  """Causal grouped-query attention.

  Args:
    q: [B, T, Hq, hd] queries.
    k, v: [B, S, Hkv, hd] keys/values (S = T without a cache, the cache length with one).
    key_mask: [B, S] bool, True where the key is a real (non-padding) token.
    query_index: [T] int, index of each query along the key axis (causality: key <= query).
    impl: "einsum" or "dot_product" (`jax.nn.dot_product_attention`; same values).

  Returns:
    [B, T, Hq, hd].
  """
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  causal = jnp.arange(k.shape[1])[None, :] <= query_index[:, None]  # [T, S]
  if impl == "dot_product":
    allowed = causal[None, None] & key_mask[:, None, None, :]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=allowed).astype(q.dtype)
  if impl != "einsum":
    raise ValueError(f"model.attention={impl!r}; expected one of {ATTENTION_IMPLS}.")
  q = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
  allowed = causal[None, None, None] & key_mask[:, None, None, None, :]
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, hq, hd)


def update_cache(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
                 index: jax.Array):
  """Writes k, v [B, T, H, hd] into the cache [B, S, H, hd] at `index`."""
  cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
  cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
  return cache_k, cache_v


def weighted_token_sum(weights: jax.Array | None):
  """None, or x [B, T, F] -> sum_t weights[b, t] x[b, t] [B, F] float32 (with weights [B, T]
  summing to 1 per row: each example's weighted mean of a layer's input)."""
  if weights is None:
    return None
  return lambda x: jnp.einsum("bt,btf->bf", weights.astype(jnp.float32), x.astype(jnp.float32))


def scan_blocks(blocks: nnx.Module, x: jax.Array, per_layer: PyTree,
                fn: Callable[[nnx.Module, jax.Array, PyTree], tuple[jax.Array, PyTree]],
                remat: bool = False, remat_policy: str = "nothing", first_trained: int = 0,
                part: str = "all", capture: Callable[[jax.Array], jax.Array] | None = None):
  """Runs stacked `blocks` over x with `jax.lax.scan` (one traced layer, any depth).

  Args:
    blocks: a block module whose variables all carry a leading layer axis.
    x: the carried activations.
    per_layer: a pytree with a leading layer axis scanned alongside (e.g. the KV cache), or None.
    fn: (block for one layer, x, per_layer slice) -> (x, per-layer output).
    remat: recompute the layer in the backward pass (`jax.checkpoint`): with policy "nothing"
      only the carried activations between layers are stored; with "dots" the layer's matmul
      outputs are kept too and only the elementwise ops are recomputed.
    first_trained: s > 0 runs layers [0, s) under `stop_gradient` (nothing of them is
      differentiated, so the backward pass ends at layer s and keeps none of their activations),
      then layers [s, L). Ignored with `per_layer` (inference with a cache: nothing to save).
    part: "all"; "below" runs only layers [0, s) (the frozen prefix, whose output a caller may
      cache: it does not depend on the trained factors); "above" only layers [s, L), from x =
      that cached output. Both need s > 0 and no `per_layer`.
    capture: reduce(input) of every adapted Dense of the trained layers [s, L) is returned too
      (`capture_lora_inputs`; not with part="below").

  Returns:
    (x, stacked per-layer outputs), or with `capture` (x, (outputs, {module path in the block:
    [L - s, ...] reduced inputs})).
  """
  graphdef, state = nnx.split(blocks)

  def plain(carry, xs):
    layer_state, extra = xs
    block = nnx.merge(graphdef, layer_state)
    return fn(block, carry, extra)

  def capturing(carry, xs):
    layer_state, extra = xs
    block = nnx.merge(graphdef, layer_state)
    with capture_lora_inputs(capture) as c:
      carry, ys = fn(block, carry, extra)
    paths = {id(m): path for path, m in block.iter_modules()}
    return carry, (ys, {paths[id(m)]: v for m, v in c.items})

  body = plain

  if remat:
    body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies,
                                               REMAT_POLICIES[remat_policy]))
  if part != "all" and (not first_trained or per_layer is not None):
    raise ValueError(f"scan_blocks part={part!r} needs first_trained > 0 and no per-layer input.")
  top = body
  if capture is not None:
    if part == "below":
      raise ValueError("scan_blocks: capture needs the trained layers (part 'all' or 'above').")
    top = capturing  # nothing is differentiated: no remat
  if first_trained and per_layer is None:
    if part != "above":
      below = jax.tree.map(lambda a: a[:first_trained], state)
      x, _ = jax.lax.scan(body, x, (jax.lax.stop_gradient(below), None))
      if part == "below":
        return x, None
    x = jax.lax.stop_gradient(x)
    return jax.lax.scan(top, x, (jax.tree.map(lambda a: a[first_trained:], state), None))
  return jax.lax.scan(top, x, (state, per_layer))
