"""Everything a run needs before training, built from a RunConfig: model, data, clients, plan.

Shared by the run loop (`train`), export, the audit and `launch.privacy`. All checks happen here,
before anything compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
from flax import nnx

from dplora_jax import lora as lora_lib
from dplora_jax.config import RunConfig
from dplora_jax import tasks
from dplora_jax.data import classification as data_lib, io
from dplora_jax.dp import plan as plan_lib, sampling
from dplora_jax.dp.ledger import Ledger
from dplora_jax.federated import partition as partition_lib
from dplora_jax.metrics import tree_bytes
from dplora_jax.tasks.scoring import ModelParts
from dplora_jax.models import ModelConfig, build_model, configure_execution, load_tokenizer
from dplora_jax.models.loading import fill, model_fingerprint, open_weights

# The config seed's children: model init only (DP randomness never comes from the config seed:
# see `dp.randomness`).
KEY_INIT = 0


@dataclasses.dataclass
class Setup:
  """Everything built before training (no compilation yet).

  `clients` and their sizes are private: they feed the samplers and nothing that is released.
  """
  cfg: RunConfig
  graphdef: Any
  lora: Any
  frozen: Any
  tokenizer: Any
  clients: list  # per-client Examples
  task: Any  # the `dplora_jax.tasks` Task
  eval_items: list  # the task's held-out items (public)
  plan: plan_lib.PrivacyPlan
  max_batch: int
  rates: list  # per-client Poisson rates (the plan's public q in DP modes)
  loss_positions: int  # P: the longest answer in tokens (the loss's head runs at P positions)
  full_model_bytes: int
  factor_bytes: dict  # {"a": bytes of all A, "b": bytes of all B}
  model_path: str = ""
  fingerprint: str = ""  # of the base weights (checkpoints reference it)
  # with `build(..., abstract_frozen=True)`: the opened checkpoint; `frozen` then holds
  # ShapeDtypeStructs until `models.sliced.place_frozen` reads it onto the mesh
  weights: Any = None
  label_tokens: tuple = ()  # optim.loss='labels': the label words' first tokens (`loss_labels`)


def random_arch(cfg: RunConfig, tok) -> tuple[ModelConfig, str]:
  """(architecture, fingerprint) of a `model.random_init` base model."""
  m = cfg.model
  arch = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=m.hidden_size,
                     num_layers=m.num_layers, num_heads=m.num_heads,
                     num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
                     intermediate_size=m.intermediate_size, tie_embeddings=True,
                     dtype=m.dtype, param_dtype=m.param_dtype)
  return arch, "random:" + hashlib.sha256(repr((arch, cfg.seed)).encode()).hexdigest()


def load_base(cfg: RunConfig):
  """(model, tokenizer, fingerprint, path) of the run's base model (no LoRA)."""
  return open_base(cfg)[:4]


def open_base(cfg: RunConfig, abstract: bool = False):
  """(model, tokenizer, fingerprint, path, WeightSource or None) of the run's base model (no
  LoRA). `abstract`: a checkpoint's weights are not read (the model holds ShapeDtypeStructs;
  `models.sliced.place_frozen` reads them onto a mesh); a random-init model is always built."""
  m = cfg.model
  if m.random_init:
    tok = load_tokenizer(m.tokenizer or m.path)
    arch, ident = random_arch(cfg, tok)
    model = configure_execution(build_model(arch, seed=cfg.seed), attention=m.attention,
                                remat=m.remat, remat_policy=m.remat_policy)
    return model, tok, ident, "<random init>", None
  src = open_weights(m.path, dtype=m.dtype, param_dtype=m.param_dtype)
  model = nnx.eval_shape(lambda: build_model(src.config)) if abstract else fill(src)
  configure_execution(model, attention=m.attention, remat=m.remat, remat_policy=m.remat_policy)
  return model, src.tokenizer(), src.fingerprint(), src.path, src


def base_fingerprint(cfg: RunConfig) -> str:
  """The fingerprint `load_base` reports, without building the model or reading its weights."""
  if cfg.model.random_init:
    return random_arch(cfg, load_run_tokenizer(cfg))[1]
  return model_fingerprint(cfg.model.path)


def load_run_tokenizer(cfg: RunConfig):
  """The tokenizer `cfg`'s run will use (without loading the model weights)."""
  m = cfg.model
  return load_tokenizer(m.tokenizer or m.path if m.random_init else m.path)


def eval_items(cfg: RunConfig, eval_file: str = "") -> list:
  """The validated held-out items of the run's task (`data.eval_file`, or `eval_file`), cut to
  the fixed subset of `data.eval_examples` (the same rows for every run and for `launch.eval`)."""
  d = cfg.data
  return tasks.get(d.task).heldout(eval_file or d.eval_file, d)[0]


def train_records(cfg: RunConfig):
  """(records, items) of the task's training file: read, cut to `data.max_train_examples`,
  validated (each bad record named by file and line)."""
  d = cfg.data
  task = tasks.get(d.task)
  recs = io.subsample(task.read(d.train_file, "train"), d.max_train_examples, cfg.seed)
  return recs, task.items(recs, d)


def client_parts(cfg: RunConfig, train_records, train_items) -> list:
  """The clients' parts (indices into the training records) of `fed.partition`."""
  labels = tasks.get(cfg.data.task).item_labels(train_items)
  field_values = None
  if cfg.fed.partition == "field":
    missing = [i for i, r in enumerate(train_records) if cfg.fed.partition_field not in r]
    if missing:
      raise ValueError(f"{train_records.where(missing[0])}: no field "
                       f"{cfg.fed.partition_field!r} (fed.partition_field).")
    field_values = [r[cfg.fed.partition_field] for r in train_records]
  return partition_lib.partition(labels, cfg.fed.num_clients, method=cfg.fed.partition,
                                 alpha=cfg.fed.dirichlet_alpha, field_values=field_values,
                                 seed=cfg.seed)


def records(cfg: RunConfig):
  """(train items, eval items, client partition): the task's records read and validated (each
  bad record named by file and line), before anything is partitioned."""
  recs, train_items = train_records(cfg)
  evals = eval_items(cfg)
  return train_items, evals, client_parts(cfg, recs, train_items)


def effective_lora(cfg: RunConfig):
  """The LoRA config actually built: FFA freezes A."""
  if cfg.fed.aggregation == "ffa" and not cfg.lora.freeze_a:
    return dataclasses.replace(cfg.lora, freeze_a=True)
  return cfg.lora


def prior_ledger(cfg: RunConfig) -> Ledger | None:
  """The privacy ledger of the starting adapter that this run must compose, or None.

  None when there is no `lora.init_from`, or it is declared public (`lora.init_from_public`).

  Raises:
    ValueError: the adapter carries no ledger and is not declared public.
  """
  lc = cfg.lora
  if not lc.init_from or lc.init_from_public:
    return None
  from dplora_jax import peft
  d = peft.read_ledger(lc.init_from)
  if d is None:
    raise ValueError(f"lora.init_from={lc.init_from!r} carries no dplora_jax privacy ledger, so "
                     "what it already spent on the private data is unknown; set "
                     "lora.init_from_public=True if it was trained without this run's private "
                     "data (the report says so).")
  return Ledger.from_dict(d)


def privacy_plan(cfg: RunConfig) -> plan_lib.PrivacyPlan:
  """The run's privacy plan, from public values only (the config and a starting adapter's
  ledger): no data is read."""
  return plan_lib.make_plan(cfg, prior_ledger(cfg))


def check_client_sizes(cfg: RunConfig, sizes: list[int]):
  """Refuses clients larger than the public bound (before training; nothing is released).

  Raises:
    ValueError: naming data.max_client_size.
  """
  bound = cfg.data.max_client_size
  if bound and max(sizes) > bound:
    over = sum(n > bound for n in sizes)
    raise ValueError(f"data.max_client_size={bound} is below the size of {over} client(s) "
                     f"(the largest holds {max(sizes)} examples): the guarantee assumes the "
                     "public bound holds; raise it, or give such clients fewer examples.")
  if cfg.dp.mode == "paper" and cfg.data.batch_size > min(sizes):
    raise ValueError(f"data.batch_size={cfg.data.batch_size} exceeds the smallest client's "
                     "data (dp.mode='paper' takes exactly B examples per step).")


def sampling_shape(cfg: RunConfig, plan: plan_lib.PrivacyPlan,
                   sizes: list[int]) -> tuple[int, list[float]]:
  """(physical batch, per-client Poisson rates).

  DP modes take both from public values (the plan, data.max_client_size); `none` without a bound
  falls back to the sizes (nothing is claimed there).
  """
  d, mb = cfg.data, cfg.optim.microbatch_size
  bound = d.max_client_size
  rates = ([d.batch_size / bound] * len(sizes) if bound
           else [min(1.0, d.batch_size / n) for n in sizes])
  if plan.max_batch:
    return plan.max_batch, rates
  if d.sampling == "poisson":  # no example-level privacy: only keep over-full samples rare
    return sampling.max_batch_for_clients([bound] if bound else sizes, d.batch_size, 1, 0.0,
                                          1e-9, mb), rates
  return int(math.ceil(d.batch_size / mb) * mb), rates


def loss_labels(cfg: RunConfig, task, tokenizer) -> tuple[int, ...]:
  """The label tokens of the training loss: () for `optim.loss='lm'`, else the task's label
  words' first tokens (public: from the config and the tokenizer).

  Raises:
    ValueError: the task is not a classification by label words, or its words share a first
      token.
  """
  return () if cfg.optim.loss == "lm" else task.label_tokens(tokenizer, cfg.data)


def attach_lora(model, cfg: RunConfig, tokenizer=None):
  """Attaches the run's initial LoRA: from `lora.init_from` (a PEFT adapter) or random from the
  run's init key (init 'zero_a_labels': with the output head's rows of the task's label tokens,
  from `tokenizer`). Deterministic, so FFA's frozen A is rebuilt identically when exporting."""
  lora_cfg = effective_lora(cfg)
  if lora_cfg.init_from:
    from dplora_jax import peft
    peft.load_adapter(model, lora_cfg.init_from, expect=lora_cfg)
  else:
    rows = None
    if lora_cfg.init == "zero_a_labels":
      if tokenizer is None:
        raise ValueError("lora.init='zero_a_labels' needs the model's tokenizer.")
      task = tasks.get(cfg.data.task)
      if task.kind != "sentiment":
        raise ValueError(f"lora.init='zero_a_labels' needs a task classified by label words; "
                         f"data.task={cfg.data.task!r} is {task.kind!r}.")
      rows = lora_lib.output_rows(model, task.label_tokens(tokenizer, cfg.data))
    lora_lib.add_lora(model, lora_cfg, jax.random.fold_in(jax.random.key(cfg.seed), KEY_INIT),
                      rows)


def build(cfg: RunConfig, extra_train: list | None = None,
          abstract_frozen: bool = False) -> Setup:
  """Loads model and data, partitions clients and fixes the privacy plan (all checks first).

  Args:
    extra_train: optional per-client `Examples` appended to each client's data (audit canaries);
      they count towards client sizes (which must stay within data.max_client_size).
    abstract_frozen: open the checkpoint without reading the frozen weights (a sharded mesh
      reads them by slices: `Setup.weights`); ignored for a random-init model.
  """
  d = cfg.data
  plan = privacy_plan(cfg)
  train_items, evals, parts = records(cfg)
  task = tasks.get(d.task)
  extra_n = [len(e) for e in extra_train] if extra_train else [0] * len(parts)
  sizes = [len(p) + extra_n[i] for i, p in enumerate(parts)]
  check_client_sizes(cfg, sizes)
  max_batch, rates = sampling_shape(cfg, plan, sizes)

  model, tok, fingerprint, model_path, weights = open_base(cfg, abstract=abstract_frozen)
  weights = weights if abstract_frozen else None  # only a model still to be read needs it
  arch = model.config
  if d.max_length > arch.max_position_embeddings:
    raise ValueError(f"data.max_length={d.max_length} exceeds the model's "
                     f"max_position_embeddings={arch.max_position_embeddings} ({model_path}); "
                     "lower data.max_length.")
  if len(tok) > arch.vocab_size:
    raise ValueError(f"tokenizer mismatch: the tokenizer of {cfg.model.tokenizer or model_path} "
                     f"has {len(tok)} tokens but the model embeds only {arch.vocab_size}; use the "
                     "model's own tokenizer (model.tokenizer).")
  full_model_bytes = tree_bytes(jax.tree.leaves(model))
  attach_lora(model, cfg, tok)
  factor_bytes = lora_lib.factor_bytes(model)
  graphdef, lora, frozen = lora_lib.split(model)
  train = task.train_examples(train_items, tok, d)
  clients = [train.subset(p) for p in parts]
  if extra_train:
    clients = [data_lib.concat([c, e]) for c, e in zip(clients, extra_train)]
  # P comes from public values (label words, data.max_answer_tokens); every training example's
  # answer must fit in it
  loss_positions = task.loss_positions(tok, d)
  longest = max(int(c.loss_mask.sum(1).max()) for c in clients if len(c))
  if longest > loss_positions:
    raise ValueError(f"an example has {longest} answer tokens but the task's loss covers "
                     f"{loss_positions} (the longest label, or data.max_answer_tokens).")
  label_tokens = loss_labels(cfg, task, tok)
  return Setup(cfg, graphdef, lora, frozen, tok, clients, task, evals, plan, max_batch, rates,
               loss_positions, full_model_bytes, factor_bytes, model_path, fingerprint, weights,
               label_tokens)


def evaluate(s: Setup, lora, items: list | None = None) -> dict:
  """The task's metrics of the model with `lora` on the held-out items (the run's by default):
  the one evaluation path of the training loop and `launch.eval`."""
  # on the host's default device: the round's mesh shardings stay out of evaluation programs
  parts = ModelParts(s.graphdef, jax.device_get(lora), s.frozen)
  return s.task.evaluate(parts, s.tokenizer, s.eval_items if items is None else items,
                         s.cfg.data)
