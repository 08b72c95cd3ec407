"""Config files: `path/to/config.py[:args]` and `--config.a.b=v` overrides -> a RunConfig.

For the launch commands (which only parse flags) and the sweep; every error names the file, the
key (with the closest valid keys) or the value.
"""

from __future__ import annotations

import ast
import importlib.util
import os

from dplora_jax.config import RunConfig, from_config_dict, unknown_keys_message


def config_module(spec: str):
  """The Python module of config file `path/to/config.py[:arg]`.

  Raises:
    FileNotFoundError naming the file.
  """
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found.")
  module_spec = importlib.util.spec_from_file_location("_dplora_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str):
  """Loads `path/to/config.py[:arg]` and returns its `get_config(arg)` (an ml_collections config).

  Raises:
    FileNotFoundError / ValueError naming the file.
  """
  path, _, arg = spec.partition(":")
  module = config_module(spec)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg).")
  return module.get_config(arg or None)


def _leaves(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out |= _leaves(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v
  return out


def parse_value(key: str, text: str, old):
  """`text` as the type of the field's current value `old`.

  Raises:
    ValueError: naming the key, the value and the expected type.
  """
  def bad(kind):
    return ValueError(f"--config.{key}={text!r}: expected {kind}.")
  if isinstance(old, bool):
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
      raise bad("true or false")
    return low in ("true", "1", "yes")
  if isinstance(old, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(old, (tuple, list)):
    text = text.strip()
    if text.startswith(("(", "[")):
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise bad("a tuple such as ('q','v') or q,v") from None
      return tuple(value)
    return tuple(s.strip() for s in text.split(",") if s.strip())
  return text


def apply_overrides(c, overrides: dict[str, str]):
  """Sets dotted fields of the ml_collections config `c` (a copy is returned).

  Raises:
    ValueError: an unknown key (with the closest known ones), or a value of the wrong type.
  """
  d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
  leaves = _leaves(d)
  for key, text in overrides.items():
    if key not in leaves:
      raise ValueError(unknown_keys_message([key], sorted(leaves)))
    *path, field = key.split(".")
    node = d
    for p in path:
      node = node[p]
    node[field] = parse_value(key, text, leaves[key])
  return d


def load_with_overrides(spec: str, overrides: dict[str, str] | None = None) -> RunConfig:
  """The validated RunConfig of `path.py[:args]` with `overrides` applied."""
  c = load_config_file(spec)
  return from_config_dict(apply_overrides(c, overrides or {}))
