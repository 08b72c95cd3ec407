"""Typed, validated run configuration.

`configs/<exp>.py` files build an `ml_collections.ConfigDict`; `from_config_dict` turns it into
these frozen dataclasses. Every check happens here, before any model is loaded or anything is
compiled, and raises `ValueError` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import json
from typing import Any, Mapping

from dplora_jax.lora import LoRAConfig

DP_MODES = ("sample", "client", "sample+client", "paper", "none")
PAPER_NOISE = ("sigma_c", "sigma_c_over_b")
NOISE_AT = ("client", "server")
ACCOUNTANTS = ("rdp", "pld")
PARTITIONS = ("iid", "dirichlet", "field")
AGGREGATIONS = ("fedavg", "ffa")
WEIGHTINGS = ("examples", "uniform")
SERVER_OPTIMIZERS = ("fedavg", "fedadam")
SERVER_LR_DECAYS = ("constant", "cosine")
CLIENT_OPTIMIZERS = ("sgd", "adamw")
SAMPLINGS = ("poisson", "shuffle")


def _check(cond: bool, field: str, value: Any, allowed: str):
  if not cond:
    raise ValueError(f"{field}={value!r} is invalid; expected {allowed}.")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Which base model. `path`: HF directory, .gguf, or alias; or random init for tests."""
  path: str = "smollm2-135m-instruct"  # HF directory, .gguf file, or alias
  random_init: bool = False  # True: a random tiny Llama (tests) with the dims below
  tokenizer: str = ""  # tokenizer path/alias for random_init ("" = model.path)
  hidden_size: int = 32  # random_init only
  num_layers: int = 2  # random_init only
  num_heads: int = 4  # random_init only
  num_kv_heads: int = 2  # random_init only
  intermediate_size: int = 64  # random_init only
  dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # storage dtype of the frozen weights
  attention: str = "einsum"  # einsum, or dot_product (jax.nn.dot_product_attention; cuDNN on GPU)
  remat: bool = False  # recompute each layer in the backward pass (less memory, more compute)
  # with remat, what a layer keeps: nothing, or dots (its matmul outputs; on CPU faster than no
  # remat at all: the elementwise ops are cheaper to recompute than to store and reload)
  remat_policy: str = "nothing"
  # with lora.first_layer > 0: compute each client's activations entering that layer once per run
  # and reuse them every step (exact; costs n_k x T x hidden floats of memory per client; not with
  # mesh.fsdp > 1, where the frozen weights are sliced over devices)
  cache_prefix: bool = True
  # with cache_prefix: also keep those activations in this directory, keyed by everything they
  # depend on, so a later run on the same rows (a sweep's other points) reads them instead of
  # recomputing ("" = never kept). They are as sensitive as the training rows (not a DP release):
  # owner-only files; keep the directory where the data lives (`dplora_jax.prefix_cache`)
  prefix_cache_dir: str = ""

  def __post_init__(self):
    for f in ("dtype", "param_dtype"):
      _check(getattr(self, f) in ("float32", "bfloat16"), f"model.{f}", getattr(self, f),
             "'float32' or 'bfloat16'")
    _check(self.attention in ("einsum", "dot_product"), "model.attention", self.attention,
           "'einsum' or 'dot_product'")
    _check(self.remat_policy in ("nothing", "dots"), "model.remat_policy", self.remat_policy,
           "'nothing' or 'dots'")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Task data: local files (jsonl, json, csv, parquet, a `datasets` directory) of a task."""
  task: str = "tfns"  # a name of `dplora_jax.tasks` (tfns, fiqa_sa, fpb, boolq, medquad, ...)
  # "" = the task's default; else a path, `PATH::train` / `PATH::test` (fixed-seed parts of one
  # file) or a packaged name (e.g. "tfns/train.jsonl")
  train_file: str = ""
  eval_file: str = ""  # public held-out data, same fields
  # sentiment tasks: label id -> answer word (TFNS order) and the FinGPT prompt
  labels: tuple[str, ...] = ("negative", "positive", "neutral")
  prompt: str = ("Instruction: What is the sentiment of this tweet? Please choose an answer "
                 "from {negative/neutral/positive}.\nInput: {text}\nAnswer:")  # FinGPT
  max_length: int = 80  # tokens per example (the text is truncated, never the answer)
  max_answer_tokens: int = 32  # choice / qa tasks: answers cut to this (the loss's positions)
  eval_batch_size: int = 32  # rows per evaluation batch
  max_new_tokens: int = 64  # qa tasks: greedy tokens generated per answer (0 = no ROUGE)
  chat_template: bool = True  # qa tasks: the question as a user turn of the tokenizer's template
  max_train_examples: int = 0  # 0 = all
  eval_examples: int = 200  # fixed subset of the eval file (0 = all)
  batch_size: int = 8  # B: expected Poisson batch of a client of max_client_size; the divisor
  # PUBLIC upper bound on any client's number of examples. DP modes derive the sampling rate
  # q = batch_size / max_client_size, the noise and the physical batch from it (never from the
  # private sizes); a client holding more is refused before training. 0 = none (dp.mode none /
  # paper only).
  max_client_size: int = 0
  sampling: str = "poisson"  # poisson (required by DP) or shuffle (non-private baselines, paper)
  # sequence-length buckets: each microbatch runs at the shortest of N lengths (multiples of 8
  # up to max_length) that holds its examples; all N are compiled into the round ahead of time.
  # 1 = always max_length. Needs fed.client_loop = map.
  length_buckets: int = 3

  def __post_init__(self):
    from dplora_jax import tasks
    tasks.get(self.task)  # an unknown name raises, naming the closest ones
    _check(self.max_length >= 8, "data.max_length", self.max_length, ">= 8")
    _check(1 <= self.max_answer_tokens < self.max_length, "data.max_answer_tokens",
           self.max_answer_tokens, "in [1, data.max_length)")
    _check(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, ">= 1")
    _check(self.max_new_tokens >= 0, "data.max_new_tokens", self.max_new_tokens, ">= 0")
    _check(1 <= self.length_buckets <= 16, "data.length_buckets", self.length_buckets,
           "an integer in [1, 16]")
    _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
    _check(self.eval_examples >= 0, "data.eval_examples", self.eval_examples, ">= 0")
    _check(self.max_client_size >= 0, "data.max_client_size", self.max_client_size,
           ">= 0 (a public bound on client sizes; 0 = none)")
    _check(len(self.labels) >= 2, "data.labels", self.labels, "at least 2 labels")
    _check(self.sampling in SAMPLINGS, "data.sampling", self.sampling, f"one of {SAMPLINGS}")
    _check("{text}" in self.prompt, "data.prompt", self.prompt, "a template containing {text}")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """Differential privacy.

  mode: "sample" (per-example DP-SGD on every client; unit: one example), "client" (DP-FedAvg:
  clip each client's update, noise at the server; unit: one whole client), "sample+client" (both,
  two guarantees), "paper" (the paper's Algorithm 1 as written, see `dp.plan`), "none".
  Fields without a prefix are the example-level (and paper) mechanism; `client_*` and
  `adaptive_*` fields are the client-level mechanism.
  """
  # sample: per-example DP-SGD in each client (unit: one example); client: DP-FedAvg (unit: one
  # client); sample+client: both guarantees; paper: the paper's Algorithm 1; none: no privacy
  mode: str = "sample"
  clip_norm: float = 1.0  # C, per-example L2 bound over the whole LoRA tree
  noise_multiplier: float = 0.0  # sigma; 0 = calibrate from target_epsilon
  target_epsilon: float = 8.0  # end-to-end eps for every client's examples
  delta: float = 1e-5  # end-to-end delta (must be < 1 / data.max_client_size)
  accountant: str = "rdp"  # rdp or pld (dp-accounting)
  allow_large_delta: bool = False  # permit delta >= 1/n
  max_batch_size: int = 0  # physical Poisson batch cap (0 = automatic, see dp/sampling.py)
  # over-full Poisson samples (cut to max_batch): "accounted" in the PLD event (dp-accounting's
  # truncated-Poisson Gaussian; needs accountant pld; max_batch near the expected batch),
  # "delta" charged to delta (any accountant; max_batch far in the tail), "auto" = accounted
  # under pld, delta under rdp. See dp/plan.py.
  truncation: str = "auto"
  truncation_slack: float = 0.01  # accounted: max_batch whose eps is within 1% of untruncated
  truncation_delta_fraction: float = 0.01  # delta: share of delta for over-full Poisson samples
  client_clip_norm: float = 0.1  # S: client-level L2 bound on each client's LoRA update (initial)
  client_noise_multiplier: float = 0.0  # server noise sigma (std sigma * S); 0 = calibrate
  client_target_epsilon: float = 8.0  # end-to-end eps for a whole client
  client_delta: float = 1e-3  # client-level delta (must be < 1/num_clients)
  adaptive_clip_quantile: float = 0.0  # adaptive S: target unclipped fraction gamma (0 = fixed)
  adaptive_clip_lr: float = 0.2  # adaptive S: eta, S <- S exp(-eta (unclipped fraction - gamma))
  adaptive_clip_count_noise: float = 0.0  # adaptive S: std of the count noise (0 = expected/20)
  paper_noise: str = "sigma_c"  # paper mode noise std: sigma_c (sigma*C) or sigma_c_over_b
  # sample mode: who adds the example-level noise. "client": each client noises its own clipped
  # sum (no one else ever sees an un-noised value). "server": a TRUSTED aggregator sums the
  # clients' clipped, un-noised sums and noises the total once (sqrt(participants) less noise on
  # the average at the same eps; the same accounting); needs fed.local_steps=1 and plain SGD.
  noise_at: str = "client"
  # lora.centre: the noise multiplier of the centre's one release (sensitivity 1 per example; its
  # Gaussian event is composed into the example-level guarantee; noised where dp.noise_at says)
  centre_noise_multiplier: float = 4.0
  # -1: every source of DP randomness (noise, example and client sampling, truncation) comes from
  # OS entropy (secret); >= 0 seeds them all, for reproductions only: anyone with the config can
  # then regenerate the noise and the samples (the report says so).
  reproducible_seed: int = -1

  @property
  def truncation_method(self) -> str:
    if self.truncation == "auto":
      return "accounted" if self.accountant == "pld" else "delta"
    return self.truncation

  @property
  def sample_level(self) -> bool:
    return self.mode in ("sample", "sample+client")

  @property
  def client_level(self) -> bool:
    return self.mode in ("client", "sample+client")

  @property
  def adaptive(self) -> bool:
    return self.client_level and self.adaptive_clip_quantile > 0

  def __post_init__(self):
    _check(self.mode in DP_MODES, "dp.mode", self.mode, f"one of {DP_MODES}")
    _check(self.accountant in ACCOUNTANTS, "dp.accountant", self.accountant,
           f"one of {ACCOUNTANTS}")
    _check(self.paper_noise in PAPER_NOISE, "dp.paper_noise", self.paper_noise,
           f"one of {PAPER_NOISE}")
    _check(self.noise_at in NOISE_AT, "dp.noise_at", self.noise_at, f"one of {NOISE_AT}")
    if self.noise_at == "server":
      _check(self.mode == "sample", "dp.noise_at", self.noise_at,
             "'client' unless dp.mode='sample' (the aggregator noises the example-level sum)")
    _check(self.centre_noise_multiplier > 0 and math.isfinite(self.centre_noise_multiplier),
           "dp.centre_noise_multiplier", self.centre_noise_multiplier, "a finite number > 0")
    _check(isinstance(self.reproducible_seed, int) and self.reproducible_seed >= -1,
           "dp.reproducible_seed", self.reproducible_seed, "-1 (OS entropy) or an integer >= 0")
    if self.mode in ("sample", "sample+client", "paper"):
      _check(self.clip_norm > 0 and math.isfinite(self.clip_norm), "dp.clip_norm", self.clip_norm,
             "a finite number > 0")
      _check(0 < self.delta < 1, "dp.delta", self.delta, "a number in (0, 1)")
      _check(self.noise_multiplier >= 0, "dp.noise_multiplier", self.noise_multiplier, ">= 0")
      if self.noise_multiplier == 0:
        _check(self.target_epsilon > 0, "dp.target_epsilon", self.target_epsilon,
               "> 0 (or set dp.noise_multiplier)")
      _check(0 < self.truncation_delta_fraction < 1, "dp.truncation_delta_fraction",
             self.truncation_delta_fraction, "a number in (0, 1)")
      _check(self.truncation in ("auto", "accounted", "delta"), "dp.truncation",
             self.truncation, "auto, accounted or delta")
      _check(0 < self.truncation_slack < 1, "dp.truncation_slack", self.truncation_slack,
             "a number in (0, 1)")
      _check(self.max_batch_size >= 0, "dp.max_batch_size", self.max_batch_size, ">= 0")
    if self.client_level:
      _check(self.client_clip_norm > 0 and math.isfinite(self.client_clip_norm),
             "dp.client_clip_norm", self.client_clip_norm, "a finite number > 0")
      _check(0 < self.client_delta < 1, "dp.client_delta", self.client_delta, "a number in (0, 1)")
      _check(self.client_noise_multiplier >= 0, "dp.client_noise_multiplier",
             self.client_noise_multiplier, ">= 0")
      if self.client_noise_multiplier == 0:
        _check(self.client_target_epsilon > 0, "dp.client_target_epsilon",
               self.client_target_epsilon, "> 0 (or set dp.client_noise_multiplier)")
      _check(0 <= self.adaptive_clip_quantile < 1, "dp.adaptive_clip_quantile",
             self.adaptive_clip_quantile, "0 (fixed S) or a quantile in (0, 1)")
      _check(self.adaptive_clip_lr > 0, "dp.adaptive_clip_lr", self.adaptive_clip_lr, "> 0")
      _check(self.adaptive_clip_count_noise >= 0, "dp.adaptive_clip_count_noise",
             self.adaptive_clip_count_noise, ">= 0")


@dataclasses.dataclass(frozen=True)
class FedConfig:
  """Federation: clients, rounds, local steps, aggregation."""
  num_clients: int = 5  # K
  rounds: int = 10  # T
  local_steps: int = 1  # DP-SGD steps per client per round
  partition: str = "iid"  # iid, dirichlet or field
  dirichlet_alpha: float = 1.0  # label skew for dirichlet
  partition_field: str = ""  # record field naming the client, for partition=field
  client_rate: float = 1.0  # Poisson client sampling rate p (1 = all clients, the paper)
  aggregation: str = "fedavg"  # fedavg: A and B averaged separately (the paper); ffa: A frozen
  # client weights: uniform (every DP mode: sizes are private) or examples (FedAvg by size; only
  # with dp.mode none, where nothing is claimed)
  weighting: str = "uniform"
  server_optimizer: str = "fedavg"  # fedavg (lr 1 = averaging) or fedadam
  server_lr: float = 1.0  # server learning rate
  # fedavg only: heavy-ball momentum of the server step (FedAvgM, Hsu et al. 2019; 0 = plain
  # averaging). Post-processing of the released average: no privacy cost.
  server_momentum: float = 0.0
  # the server learning rate over the rounds: constant, or cosine from server_lr to 0 at the
  # last round (under clipping every step has about the same length, so without a decay the
  # model oscillates around what it has learnt; post-processing: no privacy cost)
  server_lr_decay: str = "constant"
  # fedadam only: its epsilon, the "degree of adaptivity" tau of Reddi et al. 2021 (they tune it
  # in 1e-5..1e-1); under DP it should sit near the per-coordinate noise of the average update,
  # or the normalisation amplifies noise in coordinates that carry no signal
  server_adam_eps: float = 1e-3
  # the clients of one device: map (one after another; each runs only its own microbatches, at
  # their length buckets) or vmap (batched: all run the largest client's microbatches at full
  # length; can be faster on accelerators with many small clients)
  client_loop: str = "map"

  def __post_init__(self):
    _check(self.num_clients >= 1, "fed.num_clients", self.num_clients, ">= 1")
    _check(self.client_loop in ("map", "vmap"), "fed.client_loop", self.client_loop,
           "'map' or 'vmap'")
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
    _check(self.server_lr_decay in SERVER_LR_DECAYS, "fed.server_lr_decay", self.server_lr_decay,
           f"one of {SERVER_LR_DECAYS}")
    _check(0 <= self.server_momentum < 1, "fed.server_momentum", self.server_momentum,
           "a number in [0, 1)")
    _check(self.server_momentum == 0 or self.server_optimizer == "fedavg", "fed.server_momentum",
           self.server_momentum, "0 unless fed.server_optimizer='fedavg' (fedadam has its own)")
    _check(self.server_adam_eps > 0, "fed.server_adam_eps", self.server_adam_eps, "> 0")
    _check(self.server_adam_eps == 1e-3 or self.server_optimizer == "fedadam",
           "fed.server_adam_eps", self.server_adam_eps,
           "the default 1e-3 unless fed.server_optimizer='fedadam' (fedavg has no epsilon)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Client optimizer (reset every round: clients are stateless)."""
  optimizer: str = "sgd"  # client optimizer: sgd (the paper) or adamw
  learning_rate: float = 0.5  # client learning rate
  weight_decay: float = 0.0  # adamw only
  microbatch_size: int = 8  # per-example gradients computed this many at a time
  # the training loss: "lm" (cross-entropy over the vocabulary on every answer token) or "labels"
  # (classification tasks: cross-entropy over the label words' first tokens at the first answer
  # position, i.e. the label-restricted softmax the evaluation ranks by; LM-BFF's head)
  loss: str = "lm"

  def __post_init__(self):
    _check(self.optimizer in CLIENT_OPTIMIZERS, "optim.optimizer", self.optimizer,
           f"one of {CLIENT_OPTIMIZERS}")
    _check(self.learning_rate >= 0, "optim.learning_rate", self.learning_rate, ">= 0")
    _check(self.microbatch_size >= 1, "optim.microbatch_size", self.microbatch_size, ">= 1")
    _check(self.loss in ("lm", "labels"), "optim.loss", self.loss, "'lm' or 'labels'")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How the round is laid out on devices (execution only: the same mechanism and numbers up to
  float summation order)."""
  # devices per group that splits the frozen base weights (the mesh's "fsdp" axis; the
  # "clients" axis takes the rest): 1 = every device holds the whole base model
  fsdp: int = 1
  # sum the client updates in client order (an all_gather, then a sequential sum): results
  # bitwise independent of the number of devices and processes; default a psum (equal up to
  # float summation order, ~1e-8)
  ordered_aggregation: bool = False

  def __post_init__(self):
    _check(isinstance(self.fsdp, int) and self.fsdp >= 1, "mesh.fsdp", self.fsdp,
           "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run. Every field's default lives here; `configs/common.py` builds from them."""
  model: ModelSource = dataclasses.field(default_factory=ModelSource)
  lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  dp: DPConfig = dataclasses.field(default_factory=DPConfig)
  fed: FedConfig = dataclasses.field(default_factory=FedConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  seed: int = 0  # init, partitions and data order (never DP randomness: dp.reproducible_seed)
  log_every: int = 1  # write metrics.jsonl every this many rounds
  checkpoint_every: int = 1  # save every this many rounds (0 = never); the last round always
  checkpoint_keep: int = 3  # keep the newest K checkpoints
  # evaluate the released LoRA on the public held-out set every this many rounds (metrics.jsonl
  # `eval`; 0 = before the first and after the last round only)
  eval_every: int = 0
  # True: also log unnoised statistics of the private batches (training loss, clip fraction,
  # update norms, example counts, sampler overflows, round times). They are NOT covered by any eps;
  # the report says so. Local debugging only.
  private_diagnostics: bool = False

  def __post_init__(self):
    _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
    _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every,
           ">= 0 (0 = never)")
    _check(self.checkpoint_keep >= 1, "checkpoint_keep", self.checkpoint_keep, ">= 1")
    _check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
    dp, fed = self.dp, self.fed
    if dp.mode != "none" and fed.weighting != "uniform":
      raise ValueError(f"fed.weighting={fed.weighting!r} with dp.mode={dp.mode!r}: weighting by "
                       "client size releases the private sizes (and changes the sensitivity); "
                       "use fed.weighting='uniform'.")
    if (dp.sample_level or dp.client_level) and self.data.max_client_size == 0:
      raise ValueError(f"data.max_client_size=0 with dp.mode={dp.mode!r}: DP needs a public upper "
                       "bound on every client's number of examples (q = data.batch_size / "
                       "data.max_client_size); set it (e.g. the size the consortium declares).")
    if dp.mode in ("sample", "sample+client") and self.data.sampling != "poisson":
      raise ValueError(f"data.sampling={self.data.sampling!r} with dp.mode={dp.mode!r}: "
                       "DP accounting assumes Poisson sampling; use data.sampling='poisson'.")
    if dp.client_level:
      if dp.client_delta >= 1.0 / fed.num_clients and not dp.allow_large_delta:
        raise ValueError(f"dp.client_delta={dp.client_delta} >= 1/{fed.num_clients} (one over the "
                         "number of clients): such a delta allows releasing a client outright; "
                         "lower it or set dp.allow_large_delta=True.")
    if dp.noise_at == "server":
      if fed.local_steps != 1:
        raise ValueError(f"fed.local_steps={fed.local_steps} with dp.noise_at='server': the "
                         "aggregator noises one clipped gradient sum per round, so a client may "
                         "take no un-noised step before it; set fed.local_steps=1.")
      if self.optim.optimizer != "sgd":
        raise ValueError(f"optim.optimizer={self.optim.optimizer!r} with dp.noise_at='server': "
                         "the clients' step is applied to the released average, which needs "
                         "plain SGD; set optim.optimizer='sgd' (a server optimizer may follow).")
    if dp.mode == "paper":
      if fed.client_rate != 1.0:
        raise ValueError(f"fed.client_rate={fed.client_rate} with dp.mode='paper': Algorithm 1 "
                         "uses all K clients every round; set fed.client_rate=1.0.")
      if fed.local_steps != 1:
        raise ValueError(f"fed.local_steps={fed.local_steps} with dp.mode='paper': Algorithm 1 "
                         "takes one local step per round; set fed.local_steps=1.")
      if self.optim.optimizer != "sgd":
        raise ValueError(f"optim.optimizer={self.optim.optimizer!r} with dp.mode='paper': "
                         "Algorithm 1 takes a plain SGD step; set optim.optimizer='sgd'.")
      if (fed.server_optimizer != "fedavg" or fed.server_lr != 1.0 or fed.server_momentum
          or fed.server_lr_decay != "constant"):
        raise ValueError(f"fed.server_optimizer={fed.server_optimizer!r}, fed.server_lr="
                         f"{fed.server_lr}, fed.server_momentum={fed.server_momentum}, "
                         f"fed.server_lr_decay={fed.server_lr_decay!r} with dp.mode='paper': "
                         "Algorithm 1 averages A and B; set fed.server_optimizer='fedavg', "
                         "fed.server_lr=1.0, fed.server_momentum=0 and "
                         "fed.server_lr_decay='constant'.")
      if self.data.sampling != "shuffle":
        raise ValueError(f"data.sampling={self.data.sampling!r} with dp.mode='paper': Algorithm 1 "
                         "takes a batch of exactly B examples; set data.sampling='shuffle'.")
    if self.lora.centre != "none":
      if dp.mode not in ("none", "sample"):
        raise ValueError(f"lora.centre={self.lora.centre!r} with dp.mode={dp.mode!r}: the centre's "
                         "release is accounted per example (dp.mode='sample'; or 'none'); its "
                         "client-level and paper-mode sensitivity is not worked out.")
      if self.lora.init_from:
        raise ValueError(f"lora.centre={self.lora.centre!r} with lora.init_from: a new centre "
                         "would change what the starting adapter computes; start without one.")
      if self.mesh.fsdp > 1:
        raise ValueError(f"lora.centre={self.lora.centre!r} with mesh.fsdp={self.mesh.fsdp}: the "
                         "centre is computed on whole frozen weights; use mesh.fsdp=1.")
    if fed.aggregation == "ffa" and self.lora.init in ("zero_a", "zero_a_labels"):
      raise ValueError(f"fed.aggregation='ffa' with lora.init={self.lora.init!r}: FFA-LoRA keeps "
                       "A at its initial value, so a zero A would never train; use "
                       "lora.init='kaiming' or 'gaussian'.")


TOP_LEVEL = {"seed", "log_every", "checkpoint_every", "checkpoint_keep", "private_diagnostics",
             "eval_every"}
# Fields that change neither privacy nor shapes nor numerics: a resumed run may change them.
RESUME_MAY_CHANGE = ("log_every", "checkpoint_every", "checkpoint_keep", "data.eval_examples",
                     "data.eval_file", "data.eval_batch_size", "data.max_new_tokens", "eval_every",
                     # execution only: how the same mechanism is computed
                     "model.attention", "model.remat", "model.remat_policy",
                     "model.cache_prefix", "model.prefix_cache_dir", "data.length_buckets",
                     "fed.client_loop", "mesh.fsdp", "mesh.ordered_aggregation")
RENAMED = {"dp.noise_seed": "dp.reproducible_seed"}
_SECTIONS = {"model": ModelSource, "lora": LoRAConfig, "data": DataConfig, "dp": DPConfig,
             "fed": FedConfig, "optim": OptimConfig, "mesh": MeshConfig}


def unknown_keys_message(unknown: list[str], known: list[str]) -> str:
  """'unknown config key x (closest: a, b)' for each unknown key."""
  import difflib
  parts = []
  for k in unknown:
    close = difflib.get_close_matches(k, known, n=3, cutoff=0.4)
    parts.append(f"{k} (closest: {', '.join(close)})" if close else k)
  return (f"unknown config key{'s' if len(unknown) > 1 else ''} {'; '.join(parts)}; see "
          "dplora_jax/config.py for every field.")


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
    for k in unknown:
      if f"{name}.{k}" in RENAMED:
        raise ValueError(f"config key {name}.{k} was renamed {RENAMED[f'{name}.{k}']} (it seeds "
                         "every source of DP randomness, not only the noise).")
    if unknown:
      raise ValueError(unknown_keys_message([f"{name}.{k}" for k in unknown],
                                            [f"{name}.{k}" for k in sorted(known)]))
    for k, v in section.items():
      if isinstance(v, list):
        section[k] = tuple(v)
    kwargs[name] = cls(**section)
  unknown = sorted(set(d) - TOP_LEVEL)
  if unknown:
    raise ValueError(unknown_keys_message(unknown, sorted(TOP_LEVEL | set(_SECTIONS))))
  return RunConfig(**kwargs, **d)


def defaults() -> dict:
  """The nested dict of every field's default (the one source of truth for configs/common.py).

  Sections are built one by one: a RunConfig of pure defaults would be refused (DP needs
  data.max_client_size), and experiment files set that."""
  out = {name: dataclasses.asdict(cls()) for name, cls in _SECTIONS.items()}
  out |= {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in TOP_LEVEL}
  return json.loads(json.dumps(out))


def to_dict(cfg: RunConfig) -> dict:
  """The JSON-serialisable nested dict of a RunConfig (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def defaults() -> dict:
  """Every field's default, nested as `to_dict` writes a config (no cross-field checks: a section
  is built alone). A field added to a section defaults to the behaviour from before it existed,
  so a saved config that lacks it ran with this value (`checkpoint.config_changes`)."""
  out = {}
  for f in dataclasses.fields(RunConfig):
    has_factory = f.default_factory is not dataclasses.MISSING
    out[f.name] = dataclasses.asdict(f.default_factory()) if has_factory else f.default
  return json.loads(json.dumps(out))
