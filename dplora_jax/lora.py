"""LoRA as its own pytree.

`add_lora` attaches factors A [in, r] and B [r, out] (stacked over layers) to the targeted Dense
layers of a model; `split` separates the model into (graphdef, lora, frozen) so that pure
functions can take and differentiate the LoRA pytree alone:

    graphdef, lora, frozen = lora_lib.split(model)
    logits = apply(graphdef, lora, frozen, tokens, mask)

delta W = scaling * A @ B with scaling = alpha / r (alpha / sqrt(r) with rsLoRA), B = 0 at init, so
the adapted model starts exactly at the base model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dplora_jax.metrics import tree_bytes
from dplora_jax.models import layers
from dplora_jax.models.loading import FAMILY_MODULES

PyTree = Any
INITS = ("kaiming", "gaussian", "zero_a", "zero_a_labels")
CENTRES = ("none", "tokens", "loss")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters.

  Attributes:
    rank: r, > 0 and <= min(in, out) of every targeted layer.
    alpha: scaling numerator (PEFT's lora_alpha).
    targets: module names ("q", "k", "v", "o", "gate", "up", "down" for Llama; "c_attn", ... for
      GPT-2; PEFT names like "q_proj" are accepted). Empty = the family's default.
    use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
    init: "kaiming" (A kaiming-uniform as PEFT, B = 0), "gaussian" (A ~ N(0, 1/r^2), B = 0),
      "zero_a" (the transposed convention: A = 0, B kaiming-uniform; not usable with FFA) or
      "zero_a_labels" (as zero_a; in the targets that write to the residual stream (o, down) B's
      first rows are the unit directions of the output head's rows of the task's label tokens,
      at the random rows' norm, so the layer starts able to move exactly the label logits; a
      function of the public weights and label words only).
    freeze_a: keep A at its initial value and train B only (FFA-LoRA).
    init_from: start from the factors of a PEFT adapter directory (rank, alpha, targets must
      match). Its privacy ledger is composed into the new run's guarantee unless
      `init_from_public` declares it trained without this run's private data.
    init_from_public: the starting adapter is public (stated in the report).
    first_layer: train the factors of layers >= first_layer only (0 = every layer). The layers
      below keep their initial factors (B = 0: the base model's layer), run under stop_gradient
      (the backward pass ends at first_layer: less compute) and their noised coordinates are
      zeroed before any update (`zero_below`, post-processing), so the noise lands on fewer
      trained coordinates. The factor tree keeps its full [L, ...] shape (zeros travel below).
    centre: "none", or a centred LoRA, delta y = scaling ((x - c) A) B, where c [L, in] is a DP
      release of the mean input of each adapted layer >= first_layer, made once before round 1
      (`dplora_jax.federated.centre`): each example's mean over its real tokens ("tokens") or
      over its loss positions ("loss"). Hidden states share a large common part (docs/results.md
      4o); without the centre a clipped per-example gradient of A spends most of its norm on it.
    centre_clip: the public bound on one example's mean input of a layer, in multiples of that
      mean's norm on random tokens under the base model (`federated.centre.bounds`); an example
      whose means exceed their bounds is clipped (all layers and targets together).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ()
  use_rslora: bool = False
  init: str = "kaiming"
  freeze_a: bool = False
  init_from: str = ""  # a PEFT adapter directory to start from ("" = random init)
  init_from_public: bool = False  # True: the adapter is declared public (its ledger not composed)
  first_layer: int = 0  # train layers >= first_layer only (0 = all)
  centre: str = "none"  # "tokens" / "loss": centred LoRA (a DP mean of each layer's input)
  centre_clip: float = 2.0  # bound: this many times a layer's mean input on random tokens

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"lora.rank={self.rank}; expected an integer > 0.")
    if self.init not in INITS:
      raise ValueError(f"lora.init={self.init!r}; expected one of {INITS}.")
    if not float(self.alpha) > 0:
      raise ValueError(f"lora.alpha={self.alpha}; expected > 0.")
    if int(self.first_layer) < 0:
      raise ValueError(f"lora.first_layer={self.first_layer}; expected an integer >= 0.")
    if self.centre not in CENTRES:
      raise ValueError(f"lora.centre={self.centre!r}; expected one of {CENTRES}.")
    if not (float(self.centre_clip) > 0 and math.isfinite(float(self.centre_clip))):
      raise ValueError(f"lora.centre_clip={self.centre_clip}; expected a finite number > 0.")

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def resolve_targets(model: nnx.Module, targets: tuple[str, ...]) -> list[str]:
  """Canonical target names for the model's family.

  Raises:
    ValueError: a name the family does not have (lists the valid ones).
  """
  fam = FAMILY_MODULES[model.family]
  targets = tuple(targets) or fam.DEFAULT_LORA_TARGETS
  out = []
  for t in targets:
    name = fam.TARGET_ALIASES.get(t, t)
    if name not in fam.LORA_TARGETS:
      valid = sorted(set(fam.LORA_TARGETS) | set(fam.TARGET_ALIASES))
      raise ValueError(f"lora.targets: unknown target {t!r} for a {model.family} model; "
                       f"expected some of {valid}.")
    if name not in out:
      out.append(name)
  return out


def target_modules(model: nnx.Module, targets: tuple[str, ...]) -> dict[str, layers.Dense]:
  """Target name -> the stacked Dense layer it adapts."""
  fam = FAMILY_MODULES[model.family]
  out = {}
  for name in resolve_targets(model, targets):
    group, attr = fam.LORA_TARGETS[name]
    out[name] = getattr(getattr(model.layers, group), attr)
  return out


def output_rows(model: nnx.Module, token_ids) -> jax.Array:
  """[k, D] float32: the output head's rows (logit directions) of `token_ids`."""
  ids = jnp.asarray(token_ids, jnp.int32)
  head = getattr(model, "lm_head", None)
  if head is not None:
    return head.kernel[...].astype(jnp.float32).T[ids]
  embed = model.embed if hasattr(model, "embed") else model.wte
  return embed.embedding[...].astype(jnp.float32)[ids]


def add_lora(model: nnx.Module, cfg: LoRAConfig, key: jax.Array,
             label_rows: jax.Array | None = None) -> nnx.Module:
  """Attaches LoRA factors to `model` in place and returns it.

  A [L, in, r] is drawn from `key` (kaiming-uniform bound 1/sqrt(in) as PEFT, or N(0, 1/r^2));
  B [L, r, out] is zero (init "zero_a" swaps the roles), so the adapted model equals the base
  model. Init "zero_a_labels" needs `label_rows` [k, out] (`output_rows` of the label tokens).

  Raises:
    ValueError: unknown target, or rank larger than a targeted layer's dimensions; for
      "zero_a_labels", no label rows, fewer ranks than labels, or no target that writes to the
      residual stream.
  """
  mods = target_modules(model, cfg.targets)
  num_layers = model.config.num_layers
  if cfg.first_layer >= num_layers:
    raise ValueError(f"lora.first_layer={cfg.first_layer}; the model has {num_layers} layers "
                     f"(expected 0 .. {num_layers - 1}).")
  model.lora_first_layer = int(cfg.first_layer)
  writes_residual = False
  for i, (name, dense) in enumerate(mods.items()):
    stack = dense.kernel.shape[:-2]
    d_in, d_out = dense.in_features, dense.out_features
    if cfg.rank > min(d_in, d_out):
      raise ValueError(f"lora.rank={cfg.rank} exceeds min(in, out)={min(d_in, d_out)} of target "
                       f"{name!r} ([{d_in}, {d_out}]).")
    k = jax.random.fold_in(key, i)
    b = jnp.zeros((*stack, cfg.rank, d_out), jnp.float32)
    if cfg.init == "kaiming":
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(k, (*stack, d_in, cfg.rank), jnp.float32, -bound, bound)
    elif cfg.init == "gaussian":
      a = jax.random.normal(k, (*stack, d_in, cfg.rank), jnp.float32) / cfg.rank
    else:
      a = jnp.zeros((*stack, d_in, cfg.rank), jnp.float32)
      bound = 1.0 / math.sqrt(cfg.rank)
      b = jax.random.uniform(k, (*stack, cfg.rank, d_out), jnp.float32, -bound, bound)
      if cfg.init == "zero_a_labels" and name in FAMILY_MODULES[model.family].RESIDUAL_TARGETS:
        b = _label_b(b, cfg.rank, label_rows, bound)
        writes_residual = True
    a_type = layers.FrozenLoRAParam if cfg.freeze_a else layers.LoRAParam
    # float32 whatever the base's dtype: a small noised update vanishes in a bfloat16 factor
    # (the layer casts the factors to its compute dtype when it applies them)
    dense.lora_a = a_type(a)
    dense.lora_b = layers.LoRAParam(b)
    dense.lora_scaling = float(cfg.scaling)
    if cfg.centre != "none":  # zero until `set_centre`: the uncentred layer
      dense.lora_centre = layers.LoRACentre(jnp.zeros((*stack, d_in), jnp.float32))
  if cfg.init == "zero_a_labels" and not writes_residual:
    raise ValueError(f"lora.init='zero_a_labels': none of the targets {list(mods)} writes to the "
                     "residual stream; add o or down.")
  return model


def input_sums(graphdef, lora: PyTree, frozen: PyTree, tokens: jax.Array, mask: jax.Array,
               weights: jax.Array, hidden: jax.Array | None = None) -> dict[str, jax.Array]:
  """{target: [L - first_layer, B, in] float32}: sum_t weights[b, t] x[b, t] of the input x of
  each adapted Dense of the trained layers (with weights summing to 1 per example, its mean
  input). `hidden`: the cached `frozen_prefix` of the same tokens. Not differentiated."""
  model = nnx.merge(graphdef, lora, frozen)
  captured = model(tokens, mask, hidden=hidden, capture_weights=weights)
  fam = FAMILY_MODULES[model.family]
  names = {path: name for name, path in fam.LORA_TARGETS.items()}
  return {names[tuple(path)]: v for path, v in captured.items()}


def centres(model: nnx.Module) -> dict[str, jax.Array]:
  """{target: c [L, in]} of a centred LoRA model (empty when `lora.centre` is 'none')."""
  fam = FAMILY_MODULES[model.family]
  out = {}
  for name, (group, attr) in fam.LORA_TARGETS.items():
    dense = getattr(getattr(model.layers, group), attr)
    if dense.lora_centre is not None:
      out[name] = dense.lora_centre[...]
  return out


def set_centre(model: nnx.Module, values: dict[str, Any]) -> nnx.Module:
  """Sets each target's centre c [L, in] in place (`values` from `federated.centre`).

  Raises:
    ValueError: a target without a centre, or a shape that does not match.
  """
  for name, dense in target_modules(model, tuple(values)).items():
    value = values[name]
    if dense.lora_centre is None:
      raise ValueError(f"set_centre: target {name!r} has no centre (lora.centre='none'?).")
    value = jnp.asarray(value, jnp.float32)
    if value.shape != dense.lora_centre.shape:
      raise ValueError(f"set_centre: target {name!r} has shape {value.shape}; expected "
                       f"{dense.lora_centre.shape}.")
    dense.lora_centre = layers.LoRACentre(value)
  return model


def _label_b(b: jax.Array, rank: int, label_rows, bound: float):
  """B [..., r, D] with its first k rows the unit label directions scaled to a random row's
  expected norm (bound sqrt(D / 3))."""
  if label_rows is None:
    raise ValueError("lora.init='zero_a_labels' needs the task's label tokens (a classification "
                     "task by label words).")
  rows = jnp.asarray(label_rows, jnp.float32)
  d_out = b.shape[-1]
  if rows.shape[0] > rank:
    raise ValueError(f"lora.init='zero_a_labels': lora.rank={rank} is below the {rows.shape[0]} "
                     "labels; raise it.")
  rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True) * bound * math.sqrt(d_out / 3.0)
  return b.at[..., :rows.shape[0], :].set(rows)


def split(model: nnx.Module):
  """(graphdef, lora, frozen): `lora` holds exactly the trainable LoRA factors."""
  return nnx.split(model, layers.LoRAParam, ...)


def merge(graphdef, lora: PyTree, frozen: PyTree) -> nnx.Module:
  return nnx.merge(graphdef, lora, frozen)


def apply(graphdef, lora: PyTree, frozen: PyTree, tokens: jax.Array,
          mask: jax.Array | None = None, logits_at: jax.Array | None = None,
          hidden: jax.Array | None = None) -> jax.Array:
  """Pure forward: logits [B, T, V] float32 of tokens [B, T] with the given LoRA, or only at
  the positions `logits_at` [B, P] int32 ([B, P, V]: the head and any softmax after it then
  cost P / T of the full computation). With `hidden` [B, T, D] (`frozen_prefix` of the same
  tokens) the layers below `first_layer` are not run again: the same logits."""
  return nnx.merge(graphdef, lora, frozen)(tokens, mask, logits_at=logits_at, hidden=hidden)


def frozen_prefix(graphdef, lora: PyTree, frozen: PyTree, tokens: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """The activations [B, T, D] entering layer `first_layer` (> 0). Nothing below that layer
  trains, so they are fixed for the whole run: a client computes them once and reuses them every
  step (`apply(..., hidden=)`). They are a function of its private examples: kept in its memory
  only, never released or written."""
  return nnx.merge(graphdef, lora, frozen)(tokens, mask, prefix_only=True)


def zero_below(tree: PyTree, first_layer: int) -> PyTree:
  """`tree` (LoRA-shaped, every leaf [L, ...]) with the layers below `first_layer` set to zero.

  Applied to a privatised gradient or update it is post-processing: the guarantee of the release
  is unchanged, and the untrained layers stay at their initial factors.
  """
  if not first_layer:
    return tree
  def one(x):
    keep = jnp.arange(x.shape[0]) >= first_layer
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
  return jax.tree.map(one, tree)


def trained_params(lora: PyTree, first_layer: int) -> int:
  """Coordinates that train: those of layers >= first_layer (every leaf is [L, ...])."""
  return int(sum(np.prod(x.shape[1:]) * (x.shape[0] - first_layer)
                 for x in jax.tree.leaves(lora)))


def count_params(lora: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))


def nbytes(lora: PyTree) -> int:
  """Bytes of the LoRA pytree in its actual dtypes (what travels over the network)."""
  return tree_bytes(lora)


def adapted_denses(model: nnx.Module) -> dict[tuple, layers.Dense]:
  """Path -> every Dense that carries LoRA factors."""
  return {path: m for path, m in model.iter_modules()
          if isinstance(m, layers.Dense) and m.lora_a is not None}


def centre_bias(dense: layers.Dense) -> jax.Array | None:
  """-scaling (c A) B [L, out] float32: the output shift of a centred layer (None: uncentred)."""
  if dense.lora_centre is None:
    return None
  ca = jnp.einsum("...i,...ir->...r", dense.lora_centre[...].astype(jnp.float32),
                  dense.lora_a[...].astype(jnp.float32))
  return -jnp.einsum("...r,...ro->...o", ca, dense.lora_b[...].astype(jnp.float32)) * (
      dense.lora_scaling)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with W <- W + scaling * A @ B folded in and the factors removed (a centred
  layer's -scaling (c A) B goes into its bias, created when it has none)."""
  model = nnx.clone(model)
  for dense in adapted_denses(model).values():
    w = dense.kernel[...]
    delta = jnp.einsum("...ir,...ro->...io", dense.lora_a[...].astype(jnp.float32),
                       dense.lora_b[...].astype(jnp.float32)) * dense.lora_scaling
    shift = centre_bias(dense)
    if shift is not None:
      old = (jnp.zeros(shift.shape, w.dtype) if dense.bias is None else dense.bias[...])
      dense.bias = nnx.data(nnx.Param((old.astype(jnp.float32) + shift).astype(old.dtype)))
    dense.kernel = nnx.Param((w.astype(jnp.float32) + delta).astype(w.dtype))
    dense.lora_a = None
    dense.lora_b = None
    dense.lora_centre = None
    dense.lora_scaling = 0.0
  return model


def factor_of(tree: PyTree) -> PyTree:
  """The same tree with each leaf replaced by "a" or "b": which LoRA factor it is."""
  def name(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "lora_a" in keys:
      return "a"
    if "lora_b" in keys:
      return "b"
    raise ValueError(f"not a LoRA factor: {jax.tree_util.keystr(path)}")
  return jax.tree_util.tree_map_with_path(name, tree)


def factor_bytes(model: nnx.Module) -> dict[str, int]:
  """Bytes of all A factors and all B factors of `model` (trainable or frozen)."""
  out = {"a": 0, "b": 0}
  for dense in adapted_denses(model).values():
    out["a"] += tree_bytes([dense.lora_a[...]])
    out["b"] += tree_bytes([dense.lora_b[...]])
  return out
