"""Frozen base weights placed on a mesh straight from the checkpoint, slice by slice.

With the frozen weights split over the mesh's "fsdp" axis, each process reads from the files only
the slices its own devices hold (`jax.make_array_from_callback` over `WeightSource.read`:
safetensors `get_slice`, GGUF rows of the memory map), so no host ever holds more than its share
of a 7B/8B model, plus one layer's slice of a tensor at a time. The values are those of
`loading.load_model` (a test compares them leaf by leaf).
"""

from __future__ import annotations

import jax
import numpy as np

from dplora_jax import distributed
from dplora_jax.models import loading


def _key(path) -> tuple:
  """A frozen leaf's parameter path, as `loading._weight_map` names it (no Variable `value`)."""
  key = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return key[:-1] if key and key[-1] == "value" else key


def place_frozen(source: loading.WeightSource, frozen, shardings):
  """The frozen tree as global arrays of `shardings`, read by slices from `source`.

  Args:
    source: the opened checkpoint (`loading.open_weights`).
    frozen: the frozen tree of an abstract model (`nnx.eval_shape`): checkpoint weights as
      ShapeDtypeStructs; concrete leaves (FFA's frozen A, drawn by the run) are placed as they are.
    shardings: a tree of NamedShardings matching `frozen` (`round.frozen_shardings`).

  Raises:
    ValueError: a tensor the model needs is missing or mis-shaped (names it and the file).
  """
  wmap = loading._weight_map(source.config, lm_head=True)  # noqa: SLF001 (both loaders' map)

  def one(path, leaf, sharding):
    if not isinstance(leaf, jax.ShapeDtypeStruct):  # drawn by the run, not read from the files
      return distributed.place(sharding, leaf)
    key = _key(path)
    if key not in wmap:
      raise RuntimeError(f"internal: no source tensor for {key}")
    template, transpose = wmap[key]
    stacked = "{i}" in template
    names = source.tensor_names(key, template, transpose, tuple(leaf.shape))
    dtype = np.dtype(leaf.dtype)

    def read(name, index):
      a = source.read(name, tuple(reversed(index)) if transpose else index)
      return a.T if transpose else a

    shards = {}  # each distinct slice is read once, however many local devices replicate it

    def callback(index):
      index = loading._full_slices(index, leaf.shape)  # noqa: SLF001
      where = tuple((sl.start, sl.stop) for sl in index)
      if where not in shards:
        if stacked:
          layers = range(leaf.shape[0])[index[0]]
          shards[where] = np.stack([read(names[i], index[1:]).astype(dtype) for i in layers])
        else:
          shards[where] = read(template, index).astype(dtype)
      return shards[where]

    out = jax.make_array_from_callback(tuple(leaf.shape), sharding, callback)
    shards.clear()
    return out

  return jax.tree_util.tree_map_with_path(one, frozen, shardings)
