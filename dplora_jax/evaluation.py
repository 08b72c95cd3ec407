"""Evaluation of a base model, a training workdir or a PEFT adapter on tasks: what
`launch.eval` runs, through the same `Task.evaluate` as the training loop's before/after."""

from __future__ import annotations

import dataclasses
from typing import Any

from dplora_jax import config as config_lib, lora as lora_lib, peft, tasks
from dplora_jax.tasks.scoring import ModelParts

# evaluation shapes per task kind when no workdir config says otherwise
KIND_DEFAULTS = {"sentiment": dict(max_length=80), "choice": dict(max_length=192),
                 "qa": dict(max_length=192, max_answer_tokens=64)}


@dataclasses.dataclass
class Evaluated:
  """A model ready to evaluate.

  Attributes:
    parts: (graphdef, lora, frozen).
    tokenizer: its tokenizer.
    run: the workdir's RunConfig (None for a base model or an adapter).
    source: what was loaded, for the report ({"model": ..., "adapter"/"workdir": ...}).
  """
  parts: ModelParts
  tokenizer: Any
  run: config_lib.RunConfig | None
  source: dict


def load(model: str = "", adapter: str = "", workdir: str = "") -> Evaluated:
  """Loads a model to evaluate: `workdir` (its newest checkpoint, on its own base model), or
  `model` (an HF directory, .gguf or alias) with an optional PEFT `adapter` directory.

  Raises:
    ValueError: both or neither of workdir / model, or an adapter with a workdir;
    CheckpointError: a workdir without a usable checkpoint.
  """
  if workdir:
    if adapter:
      raise ValueError("--adapter and --workdir both given: evaluate one of them.")
    from dplora_jax import export
    m, cfg, meta, tok, path = export.load_trained(workdir)
    if model and model != cfg.model.path and not cfg.model.random_init:
      from dplora_jax.models.loading import resolve_path
      if resolve_path(model) != path:
        raise ValueError(f"--model {model!r} differs from the base model of workdir {workdir!r} "
                         f"({path}); leave --model out to use the workdir's.")
    return Evaluated(ModelParts(*lora_lib.split(m)), tok, cfg,
                     {"model": path, "workdir": workdir, "round": meta["ledger"]["rounds"]})
  if not model:
    raise ValueError("give --model (with --adapter) or --workdir.")
  from dplora_jax.models import load_model
  loaded = load_model(model)
  if adapter:
    peft.load_adapter(loaded.model, adapter)
  src = {"model": loaded.path, "fingerprint": loaded.fingerprint}
  if adapter:
    src["adapter"] = adapter
  return Evaluated(ModelParts(*lora_lib.split(loaded.model)), loaded.tokenizer, None, src)


def data_config(task: str, run: config_lib.RunConfig | None, **overrides) -> config_lib.DataConfig:
  """The evaluation's DataConfig: the workdir's (so its numbers match the training loop's) or
  the task kind's defaults, with `overrides` (None values ignored) and `task` set."""
  kind = tasks.get(task).kind
  base = run.data if run is not None else config_lib.DataConfig(task=task, eval_examples=0,
                                                                 **KIND_DEFAULTS[kind])
  fields = {k: v for k, v in overrides.items() if v is not None}
  if run is not None and task != run.data.task:  # another task: not the run's held-out file
    same_kind = tasks.get(run.data.task).kind == kind
    fields = ({} if same_kind else KIND_DEFAULTS[kind]) | {"eval_file": ""} | fields
  return dataclasses.replace(base, task=task, **fields)


def evaluate(ev: Evaluated, task_name: str, file: str = "", **overrides) -> dict:
  """The task's metrics on `file` (or the task's / the workdir's held-out data).

  The rows are the fixed subset of `eval_examples` (0 = all) chosen as in training."""
  task = tasks.get(task_name)
  dc = data_config(task_name, ev.run, **overrides)
  spec = file or (dc.eval_file if ev.run is not None and task_name == ev.run.data.task else "")
  items, source = task.heldout(spec, dc)
  return {"task": task_name, "file": source, **task.evaluate(ev.parts, ev.tokenizer, items, dc)}
