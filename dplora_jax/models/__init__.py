"""Pretrained LLMs in Flax NNX, loaded from local files."""

from dplora_jax.models.config import ModelConfig, from_hf_config
from dplora_jax.models.layers import FrozenLoRAParam, LoRAParam
from dplora_jax.models.loading import (ALIASES, LoadedModel, build_model, load_model,
                                       load_tokenizer,
                                       resolve_path)

__all__ = ["ALIASES", "FrozenLoRAParam", "LoRAParam", "LoadedModel", "ModelConfig",
           "build_model", "from_hf_config", "load_model", "load_tokenizer",
           "resolve_path"]
