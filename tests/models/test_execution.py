"""Execution options change how the model runs, never what it computes: attention through
jax.nn.dot_product_attention and per-layer rematerialisation give our einsum path's values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dplora_jax import models
from dplora_jax.federated import client as client_lib
from tests import tiny


def _loss_and_grads(graphdef, lora, frozen, ex):
  per = jax.vmap(client_lib.example_loss, in_axes=(None, None, None, 0, 0, 0, 0))

  def f(l):
    return jnp.mean(per(graphdef, l, frozen, ex["tokens"], ex["mask"], ex["targets"],
                        ex["loss_mask"]))
  return jax.jit(jax.value_and_grad(f))(lora)


@pytest.mark.parametrize("attention,remat,policy", [
    ("dot_product", False, "nothing"), ("einsum", True, "nothing"), ("dot_product", True, "nothing"),
    ("einsum", True, "dots")])
def test_attention_and_remat_give_the_same_loss_and_gradients(attention, remat, policy):
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = tiny.examples(6)  # padded rows of different lengths
  want_loss, want = _loss_and_grads(graphdef, lora, frozen, ex)
  model = models.configure_execution(nnx.merge(graphdef, lora, frozen), attention=attention,
                                     remat=remat, remat_policy=policy)
  loss, got = _loss_and_grads(nnx.graphdef(model), lora, frozen, ex)
  assert float(loss) == pytest.approx(float(want_loss), abs=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dot_product_attention_matches_with_a_kv_cache():
  graphdef, lora, frozen = tiny.model_and_lora()
  einsum = nnx.merge(graphdef, lora, frozen)
  dot = models.configure_execution(nnx.merge(graphdef, lora, frozen), attention="dot_product")
  tokens = jnp.asarray(tiny.examples(2)["tokens"][:, :5])
  out = []
  for m in (einsum, dot):
    cache = m.init_cache(2, 8)
    cache_mask = jnp.zeros((2, 8), bool).at[:, :5].set(True)
    _, cache = m(tokens, cache=cache, cache_mask=cache_mask, cache_index=0)
    step_mask = cache_mask.at[:, 5].set(True)
    logits, _ = m(tokens[:, :1], cache=cache, cache_mask=step_mask, cache_index=5)
    out.append(logits)
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_unknown_attention_is_refused_by_name():
  graphdef, lora, frozen = tiny.model_and_lora()
  with pytest.raises(ValueError, match="model.attention='flash'"):
    models.configure_execution(nnx.merge(graphdef, lora, frozen), attention="flash")
  with pytest.raises(ValueError, match="model.remat_policy='some'"):
    models.configure_execution(nnx.merge(graphdef, lora, frozen), remat_policy="some")
