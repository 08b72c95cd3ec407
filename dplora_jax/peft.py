"""Hugging Face PEFT interop: export and import LoRA adapters, export merged models.

Format (../shared/REFERENCE.md section 2): `adapter_model.safetensors` with keys
`base_model.model.<HF module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
(metadata {"format": "pt"}), and `adapter_config.json`. Our factors are A [L, in, r], B [L, r, out]
with delta W = scaling * A @ B on x @ W; PEFT's torch Linear computes x @ W^T with
delta W^T = scaling * B_peft @ A_peft, so A_peft = A[l]^T and B_peft = B[l]^T. GPT-2's Conv1D
layers store [in, out] like ours; PEFT marks them `fan_in_fan_out: true`, and the factor shapes
are the same. A centred LoRA (`lora.centre`: scaling ((x - c) A) B) is PEFT's `lora_bias: true`
with `.lora_B.bias` = -(c A) B, plus CENTRE_WEIGHTS (c itself) for our own loader; merged, that
shift is the layer's bias (transformers' Llama: `attention_bias` / `mlp_bias`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from dplora_jax import lora as lora_lib
from dplora_jax.models import layers
from dplora_jax.models.loading import FAMILY_MODULES, _weight_map

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CENTRE_WEIGHTS = "dplora_lora_centre.safetensors"  # a centred LoRA's c (`lora.centre`)


def _prefix(family: str) -> str:
  return "transformer.h.{i}." if family == "gpt2" else "model.layers.{i}."


def module_path(family: str, target: str, layer: int) -> str:
  """The Hugging Face module path of our target `target` in layer `layer`."""
  return _prefix(family).format(i=layer) + FAMILY_MODULES[family].HF_MODULE_PATHS[target]


def _peft_target_names(family: str, targets: list[str]) -> list[str]:
  """PEFT `target_modules` (suffixes): q_proj... for Llama; c_attn, attn.c_proj... for GPT-2."""
  paths = FAMILY_MODULES[family].HF_MODULE_PATHS
  if family == "gpt2":
    return [paths[t] if paths[t].endswith("c_proj") else paths[t].split(".")[-1] for t in targets]
  return [paths[t].split(".")[-1] for t in targets]


def adapter_tensors(model: nnx.Module, targets: list[str]) -> dict[str, np.ndarray]:
  """{PEFT key: float32 array} of the model's LoRA factors. A centred layer's shift
  -scaling (c A) B is PEFT's `lora_bias`: lora_B's bias -(c A) B (PEFT scales it)."""
  out = {}
  for name, dense in lora_lib.target_modules(model, tuple(targets)).items():
    a = np.asarray(dense.lora_a[...], np.float32)
    b = np.asarray(dense.lora_b[...], np.float32)
    shift = lora_lib.centre_bias(dense)
    for i in range(a.shape[0]):
      key = "base_model.model." + module_path(model.family, name, i)
      out[key + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      out[key + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
      if shift is not None:
        out[key + ".lora_B.bias"] = np.asarray(shift[i], np.float32) / dense.lora_scaling
  return out


def centre_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  """{target: c [L, in]} of a centred LoRA (CENTRE_WEIGHTS: lets dplora_jax load the adapter
  back in its centred form; PEFT needs only the bias)."""
  return {k: np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in lora_lib.centres(model).items()}


LEDGER_KEY = "dplora_privacy_ledger"  # safetensors metadata key: the ledger travels with weights
LEDGER_FILE = "dplora_privacy.json"  # the same ledger, readable beside them


def export_adapter(model: nnx.Module, lora_cfg: lora_lib.LoRAConfig, out_dir: str, *,
                   base_model: str = "", readme: str = "", ledger: dict | None = None) -> str:
  """Writes adapter_config.json + adapter_model.safetensors (+ README.md) of `model`'s LoRA.

  `ledger` (a `dp.ledger.Ledger.to_dict()`) is stored in the safetensors metadata and in
  dplora_privacy.json, so a run that starts from this adapter (`lora.init_from`) composes it.
  """
  targets = lora_lib.resolve_targets(model, lora_cfg.targets)
  os.makedirs(out_dir, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora_cfg.rank),
      "lora_alpha": float(lora_cfg.alpha), "lora_dropout": 0.0, "bias": "none",
      "target_modules": _peft_target_names(model.family, targets),
      "fan_in_fan_out": model.family == "gpt2", "use_rslora": bool(lora_cfg.use_rslora),
      "use_dora": False, "modules_to_save": None, "inference_mode": True,
      "base_model_name_or_path": base_model, "init_lora_weights": True,
      "lora_bias": bool(lora_lib.centres(model)),
  }
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  metadata = {"format": "pt"}
  if ledger is not None:
    metadata[LEDGER_KEY] = json.dumps(ledger)
    write_ledger(out_dir, ledger)
  save_file(adapter_tensors(model, targets), os.path.join(out_dir, ADAPTER_WEIGHTS),
            metadata=metadata)
  centre = centre_tensors(model)
  if centre:
    save_file(centre, os.path.join(out_dir, CENTRE_WEIGHTS), metadata={"format": "pt"})
  if readme:
    with open(os.path.join(out_dir, "README.md"), "w") as f:
      f.write(readme)
  return out_dir


def write_ledger(out_dir: str, ledger: dict):
  """Writes `ledger` as LEDGER_FILE beside exported weights (adapter or merged model)."""
  with open(os.path.join(out_dir, LEDGER_FILE), "w") as f:
    json.dump(ledger, f, indent=2)


def read_ledger(adapter_dir: str) -> dict | None:
  """The privacy ledger stored in an adapter's safetensors metadata, or None (no ledger).

  Raises:
    FileNotFoundError: no adapter weights in `adapter_dir`.
    ValueError: a ledger that is not valid JSON.
  """
  from safetensors import safe_open
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {adapter_dir!r} is not a PEFT adapter directory.")
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  if LEDGER_KEY not in meta:
    return None
  try:
    return json.loads(meta[LEDGER_KEY])
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: the privacy ledger in its metadata is not valid JSON ({e}).") from e


def read_adapter_config(adapter_dir: str) -> dict:
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {adapter_dir!r} is not a PEFT adapter directory.")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}; only 'LORA' adapters load.")
  for key, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None)):
    if cfg.get(key, ok) not in (ok, [] if ok is None else ok):
      raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (expected {ok!r}).")
  if isinstance(cfg.get("r"), dict) or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
    raise ValueError(f"{path}: per-module rank/alpha patterns are not supported.")
  return cfg


def lora_config_of(adapter_dir: str, family: str) -> lora_lib.LoRAConfig:
  """Our LoRAConfig equivalent to a PEFT adapter's config."""
  cfg = read_adapter_config(adapter_dir)
  mods = cfg.get("target_modules")
  if isinstance(mods, str):
    raise ValueError(f"{adapter_dir}: target_modules given as a regex ({mods!r}) is not supported.")
  paths = FAMILY_MODULES[family].HF_MODULE_PATHS
  targets = []
  for m in mods:
    hits = [t for t, p in paths.items() if p == m or p.endswith("." + m)]
    if not hits:
      raise ValueError(f"{adapter_dir}: target module {m!r} does not exist in a {family} model.")
    targets += [t for t in hits if t not in targets]
  order = list(paths)
  centred = bool(cfg.get("lora_bias", False))
  if centred and not os.path.isfile(os.path.join(adapter_dir, CENTRE_WEIGHTS)):
    raise ValueError(f"{adapter_dir}: lora_bias=true without {CENTRE_WEIGHTS}; only the lora_bias "
                     "of a centred dplora_jax adapter is supported.")
  return lora_lib.LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                             targets=tuple(sorted(targets, key=order.index)),
                             use_rslora=bool(cfg.get("use_rslora", False)),
                             centre="tokens" if centred else "none")


def load_adapter(model: nnx.Module, adapter_dir: str,
                 expect: lora_lib.LoRAConfig | None = None) -> lora_lib.LoRAConfig:
  """Attaches a PEFT adapter's factors to `model` in place.

  Args:
    expect: the run's LoRA config; rank, alpha, rsLoRA and targets must match it (freeze_a is
      taken from it).

  Returns:
    The LoRAConfig that was applied.

  Raises:
    FileNotFoundError / ValueError naming the file, the field or the tensor.
  """
  got = lora_config_of(adapter_dir, model.family)
  cfg = got
  if expect is not None and got.centre != "none":
    raise ValueError(f"lora.init_from={adapter_dir!r} is a centred LoRA adapter (lora_bias); a run "
                     "cannot start from one yet (its centre is a release of other data).")
  if expect is not None:
    mine = lora_lib.resolve_targets(model, expect.targets)
    for field, a, b in (("rank", expect.rank, got.rank), ("alpha", expect.alpha, got.alpha),
                        ("use_rslora", expect.use_rslora, got.use_rslora),
                        ("targets", tuple(mine), got.targets)):
      if a != b:
        raise ValueError(f"lora.init_from={adapter_dir!r}: the adapter has {field}={b!r} but the "
                         f"config says lora.{field}={a!r}; make them agree.")
    cfg = expect
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (adapter weights).")
  try:
    tensors = load_file(path)
  except Exception as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e}).") from e
  lora_lib.add_lora(model, cfg, jax.random.key(0))  # shapes and types; values replaced below
  for name, dense in lora_lib.target_modules(model, cfg.targets).items():
    a_l, b_l = [], []
    for i in range(dense.kernel.shape[0]):
      key = "base_model.model." + module_path(model.family, name, i)
      for suffix, out, want in ((".lora_A.weight", a_l, (cfg.rank, dense.in_features)),
                                (".lora_B.weight", b_l, (dense.out_features, cfg.rank))):
        t = tensors.get(key + suffix)
        if t is None:
          raise ValueError(f"{path}: tensor {key + suffix!r} is missing.")
        if tuple(t.shape) != want:
          raise ValueError(f"{path}: tensor {key + suffix!r} has shape {tuple(t.shape)}; "
                           f"expected {want}.")
        out.append(np.asarray(t, np.float32).T)
    dtype = dense.kernel[...].dtype
    a_type = layers.FrozenLoRAParam if cfg.freeze_a else layers.LoRAParam
    dense.lora_a = a_type(jnp.asarray(np.stack(a_l), dtype))
    dense.lora_b = layers.LoRAParam(jnp.asarray(np.stack(b_l), dtype))
  if got.centre != "none":
    _load_centre(model, adapter_dir, tensors, path)
  if cfg.freeze_a and any(not np.any(np.asarray(d.lora_a[...])) for d in
                          lora_lib.target_modules(model, cfg.targets).values()):
    raise ValueError(f"lora.init_from={adapter_dir!r}: the adapter's A is zero, and FFA keeps A "
                     "frozen, so nothing would train; use fed.aggregation='fedavg'.")
  return cfg


def _load_centre(model: nnx.Module, adapter_dir: str, tensors: dict, path: str):
  """Sets the centre of CENTRE_WEIGHTS and checks that it gives the adapter's lora_B biases."""
  cpath = os.path.join(adapter_dir, CENTRE_WEIGHTS)
  try:
    lora_lib.set_centre(model, load_file(cpath))
  except Exception as e:
    raise ValueError(f"{cpath}: not the centre of this adapter ({e}).") from e
  for name, dense in lora_lib.target_modules(model, ()).items():
    if dense.lora_centre is None:
      continue
    shift = np.asarray(lora_lib.centre_bias(dense)) / dense.lora_scaling
    for i in range(shift.shape[0]):
      key = "base_model.model." + module_path(model.family, name, i) + ".lora_B.bias"
      bias = tensors.get(key)
      if bias is None or not np.allclose(bias, shift[i], rtol=1e-4, atol=1e-5):
        raise ValueError(f"{path}: tensor {key!r} is missing or is not -(c A) B of {cpath}.")


def _source_config(source_path: str) -> dict | None:
  src = os.path.join(source_path, "config.json") if os.path.isdir(source_path) else ""
  if src and os.path.isfile(src):
    with open(src) as f:
      return json.load(f)
  return None


def _hf_config(model_cfg, src: dict | None) -> dict:
  """config.json of the merged model: the source's own (`src`) when it is an HF directory, with
  its bias flags set to what the merged weights carry."""
  c = model_cfg
  out = src
  if out is not None:
    if c.family == "llama" and out.get("model_type") == "llama":
      out["attention_bias"], out["mlp_bias"] = c.o_bias, c.mlp_bias
    return out
  if c.family != "llama":
    raise ValueError(f"a merged export of a {c.family} model needs its HF config.json.")
  out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
         "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
         "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
         "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "max_position_embeddings": c.max_position_embeddings,
         "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.o_bias,
         "mlp_bias": c.mlp_bias, "hidden_act": "silu", "torch_dtype": "float32"}
  if c.rope_scaling:
    out["rope_scaling"] = dict(c.rope_scaling)
  return out


ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def _merged_model_config(model: nnx.Module, model_cfg, src: dict | None):
  """The model config of the merged weights. A centred LoRA merges into a bias (-s (c A) B);
  transformers' Llama has one switch for the q, k, v, o biases (`attention_bias`) and one for
  gate, up, down (`mlp_bias`), so a bias on one layer of a group turns on the group (the others
  are written as zeros); a model type without such a bias (Qwen2's o, its MLP; Mistral) is
  refused. GPT-2 has every bias already."""
  c = model_cfg
  if c.family != "llama":
    return c
  biased = set(lora_lib.centres(model))
  hf_type = "llama" if src is None else src.get("model_type")
  has = {**{n: c.attention_bias for n in ("q", "k", "v")}, "o": c.o_bias,
         **{n: c.mlp_bias for n in MLP}}
  if hf_type == "llama":  # the config this export writes has both switches
    attn = any(has[n] for n in ATTENTION) or bool(biased & set(ATTENTION))
    mlp = any(has[n] for n in MLP) or bool(biased & set(MLP))
    return dataclasses.replace(c, attention_bias=attn, o_bias=attn, mlp_bias=mlp)
  missing = sorted(n for n in biased if not has[n])
  if missing:
    raise ValueError(f"a centred LoRA on {missing} merges into a bias that transformers' "
                     f"{hf_type!r} model does not have there; export the PEFT adapter (its "
                     "lora_bias) instead.")
  return c


def export_merged(model: nnx.Module, model_cfg, tokenizer, out_dir: str, *,
                  source_path: str = "") -> str:
  """Writes base + LoRA merged as an HF model directory (config.json, model.safetensors,
  tokenizer files)."""
  src = _source_config(source_path)
  model_cfg = _merged_model_config(model, model_cfg, src)
  merged = lora_lib.merge_lora(model)
  state = nnx.state(merged, nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  wmap = _weight_map(model_cfg, lm_head=getattr(merged, "lm_head", None) is not None)
  prefix = "transformer." if model_cfg.family == "gpt2" else ""
  tensors = {}
  for key, (template, transpose) in wmap.items():
    if key not in flat:  # a zero bias of a group that one centred layer switched on
      kernel = flat[key[:-1] + ("kernel",)]
      flat[key] = np.zeros(kernel.shape[:-2] + kernel.shape[-1:], np.float32)
    arr = np.asarray(flat[key], np.float32)
    if "{i}" in template:
      for i in range(arr.shape[0]):
        tensors[prefix + template.format(i=i)] = np.ascontiguousarray(
            arr[i].T if transpose else arr[i])
    else:
      tensors[prefix + template] = np.ascontiguousarray(arr.T if transpose else arr)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_hf_config(model_cfg, src), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  elif os.path.isdir(source_path) and os.path.isfile(os.path.join(source_path, "tokenizer.json")):
    shutil.copy(os.path.join(source_path, "tokenizer.json"), out_dir)
  return out_dir
