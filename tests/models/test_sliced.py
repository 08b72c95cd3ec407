"""Frozen weights read by slices onto a (clients, fsdp) mesh (`models.sliced`): the values of the
whole-file load, each distinct shard read once and no read larger than a shard. (A training run
that reads its weights by slices across two processes, evaluates on them and equals the
one-process run that loads the model whole: tests/test_multiprocess.py.)"""

import jax
import numpy as np
import pytest
from flax import nnx

from dplora_jax import lora as lora_lib
from dplora_jax.federated import round as round_lib
from dplora_jax.models import load_tokenizer, loading, sliced
from tests import hf_fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf_llama")
  # SmolLM2's vocabulary so that the task's prompts tokenize; tiny everywhere else
  hf_fixtures.write_hf(str(d), vocab_size=49152)
  load_tokenizer("smollm2-135m-instruct").save_pretrained(str(d))
  return str(d)


class _Recorder:
  """Wraps a WeightSource's reader to record the size of every read."""

  def __init__(self, src):
    self.sizes = {}
    inner = src.reader

    def reader(name, index):
      a = inner(name, index)
      self.sizes.setdefault(name, []).append(a.size)
      return a

    src.reader = reader


def test_placed_slices_equal_the_whole_load_and_each_device_reads_only_its_share(model_dir):
  whole = lora_lib.split(loading.load_model(model_dir).model)[2]
  src = loading.open_weights(model_dir)
  rec = _Recorder(src)
  abstract = lora_lib.split(nnx.eval_shape(lambda: loading.build_model(src.config)))[2]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  mesh = round_lib.make_mesh(8, 2)  # clients 4 x fsdp 2
  shardings = round_lib.frozen_shardings(mesh, abstract)
  placed = sliced.place_frozen(src, abstract, shardings)
  for a, b, s in zip(jax.tree.leaves(placed), jax.tree.leaves(whole), jax.tree.leaves(shardings)):
    assert a.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  total = sum(x.nbytes for x in jax.tree.leaves(whole))
  # every distinct shard once (the 4 client groups replicate it: read once, not 4 times)
  assert src.bytes_read == total
  split_weights = [n for n in src.names if len(src.shapes[n]) == 2]
  assert split_weights
  for n in split_weights:  # no 2-D weight is ever read whole: two halves, one per fsdp device
    assert rec.sizes[n] == [np.prod(src.shapes[n]) // 2] * 2, n


def test_a_bfloat16_base_is_placed_in_bfloat16_equal_to_the_whole_load(model_dir):
  kw = dict(dtype="bfloat16", param_dtype="bfloat16")
  whole = lora_lib.split(loading.load_model(model_dir, **kw).model)[2]
  src = loading.open_weights(model_dir, **kw)
  abstract = lora_lib.split(nnx.eval_shape(lambda: loading.build_model(src.config)))[2]
  mesh = round_lib.make_mesh(8, 2)
  placed = sliced.place_frozen(src, abstract, round_lib.frozen_shardings(mesh, abstract))
  kernels = 0
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(whole)):
    assert a.dtype == b.dtype
    kernels += a.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert kernels >= 7  # the projections and the embedding are stored in bfloat16


def test_missing_tensor_is_named(model_dir, tmp_path):
  src = loading.open_weights(model_dir)
  src.names.discard("model.layers.1.mlp.up_proj.weight")
  abstract = lora_lib.split(nnx.eval_shape(lambda: loading.build_model(src.config)))[2]
  mesh = round_lib.make_mesh(4, 2)
  with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    sliced.place_frozen(src, abstract, round_lib.frozen_shardings(mesh, abstract))
