"""Pretrained LLMs in Flax NNX, loaded from local files."""

from dplora_jax.models.config import ModelConfig, from_hf_config
from dplora_jax.models.layers import FrozenLoRAParam, LoRAParam
from dplora_jax.models.loading import (ALIASES, LoadedModel, build_model, load_model,
                                       load_tokenizer,
                                       resolve_path)



def configure_execution(model, *, attention: str = "einsum", remat: bool = False,
                        remat_policy: str = "nothing"):
  """Sets how `model` runs (attention implementation, layer rematerialisation) in place; the
  function it computes is unchanged. Returns the model."""
  import dataclasses
  from flax import nnx
  from dplora_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES
  if attention not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={attention!r}; expected one of {ATTENTION_IMPLS}.")
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={remat_policy!r}; expected one of "
                     f"{tuple(REMAT_POLICIES)}.")
  model.config = dataclasses.replace(model.config, attention=attention, remat=bool(remat),
                                     remat_policy=remat_policy)
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "impl"):
      module.impl = attention
  return model


__all__ = ["configure_execution", "ALIASES", "FrozenLoRAParam", "LoRAParam", "LoadedModel", "ModelConfig",
           "build_model", "from_hf_config", "load_model", "load_tokenizer",
           "resolve_path"]
