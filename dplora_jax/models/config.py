"""Architecture description shared by every model family."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

FAMILIES = ("llama", "gpt2")
# Hugging Face `model_type` values we read, and the family that implements them.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a forward pass needs to know about an architecture.

  Attributes:
    family: "llama" (Llama 1/2/3, Mistral, Qwen2, SmolLM2) or "gpt2".
    vocab_size: number of token ids.
    hidden_size: model width D.
    num_layers: number of transformer blocks L.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when < num_heads).
    head_dim: width of one head.
    intermediate_size: MLP width.
    norm_eps: epsilon of RMSNorm / LayerNorm.
    rope_theta: RoPE base (llama family).
    rope_scaling: Llama-3 rope scaling as sorted (key, value) pairs, or None.
    max_position_embeddings: longest sequence the model allows.
    tie_embeddings: lm_head shares the token embedding.
    attention_bias: q/k/v projections carry a bias (Qwen2, Llama's `attention_bias`; GPT-2
      always has biases).
    o_bias: the attention output projection carries a bias (Llama's `attention_bias` covers
      q, k, v and o; Qwen2's only q, k, v).
    mlp_bias: gate, up and down carry a bias (Llama's `mlp_bias`).
    param_dtype: dtype the weights are stored in.
    dtype: dtype the matmuls run in (logits and softmax are always float32).
    model_type: the Hugging Face model_type this came from (for export).
    attention: "einsum" (our grouped einsum + fp32 softmax) or "dot_product"
      (`jax.nn.dot_product_attention`: cuDNN flash attention on GPU, XLA elsewhere). Execution
      only: the same function either way.
    remat: recompute each layer's activations in the backward pass (`jax.checkpoint` on the
      scanned block): activation memory of one layer instead of all, ~1/3 more compute.
    remat_policy: what a rematerialised layer keeps: "nothing" (recompute everything) or "dots"
      (keep the matmul outputs, recompute the elementwise ops: on CPU faster than no remat,
      docs/benchmarks.md).
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) pairs: hashable
  max_position_embeddings: int = 2048
  tie_embeddings: bool = False
  attention_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  model_type: str = "llama"
  attention: str = "einsum"
  remat: bool = False
  remat_policy: str = "nothing"

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}; expected one of {FAMILIES}.")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "intermediate_size"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; expected > 0.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}.")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected float32, "
                         "bfloat16 or float16.")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def from_hf_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config.json dict.

  Raises:
    ValueError: unsupported `model_type`, or a required field is missing.
  """
  model_type = cfg.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(
        f"{source}: model_type={model_type!r} is not supported; expected one of "
        f"{sorted(HF_MODEL_TYPES)}.")

  def need(key):
    if key not in cfg:
      raise ValueError(f"{source}: field {key!r} is missing (model_type={model_type}).")
    return cfg[key]

  if HF_MODEL_TYPES[model_type] == "gpt2":
    d = need("n_embd")
    heads = need("n_head")
    return ModelConfig(
        family="gpt2", vocab_size=need("vocab_size"), hidden_size=d,
        num_layers=need("n_layer"), num_heads=heads, num_kv_heads=heads,
        head_dim=d // heads, intermediate_size=cfg.get("n_inner") or 4 * d,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=need("n_positions"), tie_embeddings=True,
        attention_bias=True, model_type=model_type)

  d = need("hidden_size")
  heads = need("num_attention_heads")
  # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes one rope_parameters dict.
  params = dict(cfg.get("rope_parameters") or {})
  theta = cfg.get("rope_theta", params.pop("rope_theta", 10000.0))
  scaling = cfg.get("rope_scaling") or params or None
  if scaling is not None:
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("llama3", "default"):
      raise ValueError(f"{source}: rope scaling type {kind!r} is not supported; expected "
                       "'llama3' or none.")
    if kind == "default":
      scaling = None
  return ModelConfig(
      family="llama", vocab_size=need("vocab_size"), hidden_size=d,
      num_layers=need("num_hidden_layers"), num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or d // heads,
      intermediate_size=need("intermediate_size"),
      norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
      max_position_embeddings=cfg.get("max_position_embeddings", 2048),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
      # transformers' Llama puts `attention_bias` on o too, Qwen2 never biases o
      o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
      mlp_bias=bool(cfg.get("mlp_bias", False)), model_type=model_type)
