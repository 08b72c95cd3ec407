"""Typed, validated run configuration.

`configs/<exp>.py` files build an `ml_collections.ConfigDict`; `from_config_dict` turns it into
these frozen dataclasses. Every check happens here, before any model is loaded or anything is
compiled, and raises `ValueError` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from dplora_jax.lora import LoRAConfig

DP_MODES = ("sample", "none")
ACCOUNTANTS = ("rdp", "pld")
PARTITIONS = ("iid", "dirichlet", "field")
AGGREGATIONS = ("fedavg",)
WEIGHTINGS = ("examples", "uniform")
SERVER_OPTIMIZERS = ("fedavg", "fedadam")
CLIENT_OPTIMIZERS = ("sgd", "adamw")
SAMPLINGS = ("poisson", "shuffle")


def _check(cond: bool, field: str, value: Any, allowed: str):
  if not cond:
    raise ValueError(f"{field}={value!r} is invalid; expected {allowed}.")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Which base model. `path`: HF directory, .gguf, or alias; or random init for tests."""
  path: str = "smollm2-135m-instruct"
  random_init: bool = False
  tokenizer: str = ""  # path/alias of the tokenizer when random_init (defaults to `path`)
  hidden_size: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 64
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for f in ("dtype", "param_dtype"):
      _check(getattr(self, f) in ("float32", "bfloat16"), f"model.{f}", getattr(self, f),
             "'float32' or 'bfloat16'")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Task data: local jsonl files with `text` and `label` fields."""
  train_file: str = ""
  eval_file: str = ""
  labels: tuple[str, ...] = ("negative", "positive", "neutral")  # index = label id
  prompt: str = ("Instruction: What is the sentiment of this tweet? Please choose an answer "
                 "from {negative/neutral/positive}.\nInput: {text}\nAnswer:")
  max_length: int = 96
  max_train_examples: int = 0  # 0 = all
  eval_examples: int = 200
  batch_size: int = 8  # expected per-client batch per local step (Poisson: q = batch / n_k)
  sampling: str = "poisson"

  def __post_init__(self):
    _check(self.max_length >= 8, "data.max_length", self.max_length, ">= 8")
    _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
    _check(self.eval_examples >= 0, "data.eval_examples", self.eval_examples, ">= 0")
    _check(len(self.labels) >= 2, "data.labels", self.labels, "at least 2 labels")
    _check(self.sampling in SAMPLINGS, "data.sampling", self.sampling, f"one of {SAMPLINGS}")
    _check("{text}" in self.prompt, "data.prompt", self.prompt, "a template containing {text}")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """Differential privacy of examples within each client (DP-SGD on every client)."""
  mode: str = "sample"
  clip_norm: float = 1.0
  noise_multiplier: float = 0.0  # 0 = calibrate from target_epsilon
  target_epsilon: float = 8.0
  delta: float = 1e-5
  accountant: str = "rdp"
  allow_large_delta: bool = False
  max_batch_size: int = 0  # physical Poisson batch cap; 0 = smallest safe multiple of microbatch
  truncation_delta_fraction: float = 0.01  # share of delta spent on an over-full Poisson sample

  def __post_init__(self):
    _check(self.mode in DP_MODES, "dp.mode", self.mode, f"one of {DP_MODES}")
    _check(self.accountant in ACCOUNTANTS, "dp.accountant", self.accountant,
           f"one of {ACCOUNTANTS}")
    if self.mode == "none":
      return
    _check(self.clip_norm > 0 and math.isfinite(self.clip_norm), "dp.clip_norm", self.clip_norm,
           "a finite number > 0")
    _check(0 < self.delta < 1, "dp.delta", self.delta, "a number in (0, 1)")
    _check(self.noise_multiplier >= 0, "dp.noise_multiplier", self.noise_multiplier, ">= 0")
    if self.noise_multiplier == 0:
      _check(self.target_epsilon > 0, "dp.target_epsilon", self.target_epsilon,
             "> 0 (or set dp.noise_multiplier)")
    _check(0 < self.truncation_delta_fraction < 1, "dp.truncation_delta_fraction",
           self.truncation_delta_fraction, "a number in (0, 1)")
    _check(self.max_batch_size >= 0, "dp.max_batch_size", self.max_batch_size, ">= 0")


@dataclasses.dataclass(frozen=True)
class FedConfig:
  """Federation: clients, rounds, local steps, aggregation."""
  num_clients: int = 5
  rounds: int = 10
  local_steps: int = 1
  partition: str = "iid"
  dirichlet_alpha: float = 1.0
  partition_field: str = ""
  client_rate: float = 1.0  # Poisson client sampling rate p; 1 = every client every round
  aggregation: str = "fedavg"
  weighting: str = "examples"
  server_optimizer: str = "fedavg"
  server_lr: float = 1.0

  def __post_init__(self):
    _check(self.num_clients >= 1, "fed.num_clients", self.num_clients, ">= 1")
    _check(self.rounds >= 1, "fed.rounds", self.rounds, ">= 1")
    _check(self.local_steps >= 1, "fed.local_steps", self.local_steps, ">= 1")
    _check(self.partition in PARTITIONS, "fed.partition", self.partition, f"one of {PARTITIONS}")
    _check(self.dirichlet_alpha > 0, "fed.dirichlet_alpha", self.dirichlet_alpha, "> 0")
    _check(self.partition != "field" or bool(self.partition_field), "fed.partition_field",
           self.partition_field, "a field name when fed.partition='field'")
    _check(0 < self.client_rate <= 1, "fed.client_rate", self.client_rate, "a number in (0, 1]")
    _check(self.aggregation in AGGREGATIONS, "fed.aggregation", self.aggregation,
           f"one of {AGGREGATIONS}")
    _check(self.weighting in WEIGHTINGS, "fed.weighting", self.weighting, f"one of {WEIGHTINGS}")
    _check(self.server_optimizer in SERVER_OPTIMIZERS, "fed.server_optimizer",
           self.server_optimizer, f"one of {SERVER_OPTIMIZERS}")
    _check(self.server_lr > 0, "fed.server_lr", self.server_lr, "> 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Client optimizer (reset every round: clients are stateless)."""
  optimizer: str = "sgd"
  learning_rate: float = 0.5
  weight_decay: float = 0.0
  microbatch_size: int = 8  # per-example gradients are computed this many at a time

  def __post_init__(self):
    _check(self.optimizer in CLIENT_OPTIMIZERS, "optim.optimizer", self.optimizer,
           f"one of {CLIENT_OPTIMIZERS}")
    _check(self.learning_rate >= 0, "optim.learning_rate", self.learning_rate, ">= 0")
    _check(self.microbatch_size >= 1, "optim.microbatch_size", self.microbatch_size, ">= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelSource
  lora: LoRAConfig
  data: DataConfig
  dp: DPConfig
  fed: FedConfig
  optim: OptimConfig
  seed: int = 0
  log_every: int = 1

  def __post_init__(self):
    if self.dp.mode != "none" and self.data.sampling != "poisson":
      raise ValueError(f"data.sampling={self.data.sampling!r} with dp.mode={self.dp.mode!r}: "
                       "DP accounting assumes Poisson sampling; use data.sampling='poisson'.")


_SECTIONS = {"model": ModelSource, "lora": LoRAConfig, "data": DataConfig, "dp": DPConfig,
             "fed": FedConfig, "optim": OptimConfig}


def from_config_dict(cfg: Mapping[str, Any]) -> RunConfig:
  """Converts an ml_collections ConfigDict (or nested dict) into a validated RunConfig.

  Raises:
    ValueError: unknown keys or out-of-range values (naming the field).
  """
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  kwargs = {}
  for name, cls in _SECTIONS.items():
    section = dict(d.pop(name, {}) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
      raise ValueError(f"unknown config keys {[f'{name}.{k}' for k in unknown]}; "
                       f"known: {sorted(known)}.")
    for k, v in section.items():
      if isinstance(v, list):
        section[k] = tuple(v)
    kwargs[name] = cls(**section)
  unknown = sorted(set(d) - {"seed", "log_every"})
  if unknown:
    raise ValueError(f"unknown config keys {unknown}.")
  return RunConfig(**kwargs, **d)
