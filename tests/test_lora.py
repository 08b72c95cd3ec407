"""LoRA as a separate pytree: exact identity at B = 0, gradients only to LoRA, merge == unmerged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplora_jax import lora as lora_lib
from dplora_jax.models import FrozenLoRAParam, LoRAParam, ModelConfig, build_model

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, intermediate_size=48, attention_bias=True)
GPT = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=32)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)


def _perturbed(lora):
  leaves, tree = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("cfg,targets", [(TINY, ("q", "k", "v")),
                                         (TINY, ("o_proj", "gate", "up", "down")),
                                         (GPT, ("c_attn", "mlp.c_proj"))])
def test_zero_b_is_exactly_base(cfg, targets):
  model = build_model(cfg)
  base = np.asarray(model(TOKENS))
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4, targets=targets), jax.random.key(0))
  graphdef, lora, frozen = lora_lib.split(model)
  got = np.asarray(lora_lib.apply(graphdef, lora, frozen, TOKENS))
  # the base model's function, but a different compiled layer (the adapted projections apart from
  # the fused ones): equal up to float rounding (bitwise at XLA:CPU's default codegen, 4e-8 apart
  # at the tests' -O1, tests/conftest.py); a LoRA that changed the output would be far above this
  np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-7)
  # A is random, B is zero.
  for path, x in jax.tree_util.tree_flatten_with_path(lora.to_pure_dict())[0]:
    name = path[-1].key
    assert (np.asarray(x) == 0).all() == (name == "lora_b")


def test_gradients_flow_to_lora_only():
  model = build_model(TINY)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4), jax.random.key(0))
  graphdef, lora, frozen = lora_lib.split(model)
  lora = _perturbed(lora)
  # The frozen state holds no LoRA factor; the LoRA state holds nothing else.
  assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(
      frozen, is_leaf=lambda x: isinstance(x, LoRAParam)))
  assert len(jax.tree.leaves(lora)) == 2 * 3  # A and B for q, k, v (stacked over layers)

  def loss(lora, frozen):
    return jnp.mean(lora_lib.apply(graphdef, lora, frozen, TOKENS) ** 2)

  g_lora = jax.jit(jax.grad(loss))(lora, frozen)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_lora))
  assert jax.tree.structure(g_lora) == jax.tree.structure(lora)


def test_merge_equals_unmerged():
  model = build_model(TINY)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4, alpha=8, use_rslora=True,
                                               targets=("q", "v", "down")), jax.random.key(0))
  graphdef, lora, frozen = lora_lib.split(model)
  lora = _perturbed(lora)
  adapted = lora_lib.merge(graphdef, lora, frozen)
  merged = lora_lib.merge_lora(adapted)
  assert not lora_lib.adapted_denses(merged)
  np.testing.assert_allclose(np.asarray(merged(TOKENS)), np.asarray(adapted(TOKENS)), atol=1e-5)


def test_counts_and_scaling():
  model = build_model(TINY)
  cfg = lora_lib.LoRAConfig(rank=4, alpha=16)
  lora_lib.add_lora(model, cfg, jax.random.key(0))
  _, lora, _ = lora_lib.split(model)
  # per layer: q (32x4 + 4x32), k (32x4 + 4x16), v (same as k); 2 layers
  want = 2 * ((32 * 4 + 4 * 32) + 2 * (32 * 4 + 4 * 16))
  assert lora_lib.count_params(lora) == want
  assert lora_lib.nbytes(lora) == 4 * want
  assert cfg.scaling == 4.0
  assert lora_lib.LoRAConfig(rank=4, alpha=16, use_rslora=True).scaling == 8.0


def test_kaiming_bound_and_gaussian_init():
  model = build_model(TINY)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4), jax.random.key(0))
  a = np.asarray(model.layers.attn.q.lora_a[...])
  assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.5 / np.sqrt(32)
  model = build_model(TINY)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4, init="gaussian"), jax.random.key(0))
  assert abs(np.asarray(model.layers.attn.q.lora_a[...]).std() - 0.25) < 0.03


def test_freeze_a_keeps_a_out_of_the_trainable_tree():
  model = build_model(TINY)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=4, freeze_a=True), jax.random.key(0))
  _, lora, frozen = lora_lib.split(model)
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(lora.to_pure_dict())[0]}
  assert names == {"lora_b"}
  assert isinstance(model.layers.attn.q.lora_a, FrozenLoRAParam)


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "lora.rank=0"),
    (dict(rank=-2), "lora.rank=-2"),
    (dict(init="xavier"), "lora.init"),
    (dict(alpha=0), "lora.alpha"),
])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    lora_lib.LoRAConfig(**kw)


def test_bad_target_and_rank_too_large():
  model = build_model(TINY)
  with pytest.raises(ValueError, match="unknown target 'qkv_proj'"):
    lora_lib.add_lora(model, lora_lib.LoRAConfig(targets=("qkv_proj",)), jax.random.key(0))
  with pytest.raises(ValueError, match=r"lora.rank=40 exceeds min\(in, out\)=32 of target 'q'"):
    lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=40), jax.random.key(0))


def test_zero_a_init_starts_at_the_base_model_and_b_is_random():
  model = build_model(ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2,
                                  num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=24),
                      seed=0)
  tokens = jnp.arange(10)[None] % 64
  base = model(tokens)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=2, init="zero_a"), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(model.layers.attn.q.lora_a[...]), 0.0)
  assert float(jnp.abs(model.layers.attn.q.lora_b[...]).max()) > 0
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(base), atol=1e-6)


def test_zero_a_labels_init_points_b_at_the_label_logits_of_residual_writers_only():
  model = build_model(TINY, seed=0)
  tokens = jnp.arange(10)[None] % 64
  base = model(tokens)
  ids = (5, 9, 17)
  rows = lora_lib.output_rows(model, ids)
  head = (np.asarray(model.embed.embedding[...]) if model.lm_head is None
          else np.asarray(model.lm_head.kernel[...]).T)
  np.testing.assert_array_equal(np.asarray(rows), head[list(ids)])  # the label logit directions
  cfg = lora_lib.LoRAConfig(rank=4, init="zero_a_labels", targets=("v", "down"))
  lora_lib.add_lora(model, cfg, jax.random.key(0), rows)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(base), atol=1e-6)  # A = 0
  b = np.asarray(model.layers.mlp.down.lora_b[...])  # [L, 4, 32]
  unit = np.asarray(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
  for layer in range(2):
    got = b[layer, :3] / np.linalg.norm(b[layer, :3], axis=1, keepdims=True)
    np.testing.assert_allclose(got, unit, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b[layer, :3], axis=1), np.sqrt(32 / 3) / 2,
                               rtol=1e-5)  # a random row's expected norm
  # v writes the key/value heads, not the residual stream: its B is zero_a's random one
  plain = build_model(TINY, seed=0)
  lora_lib.add_lora(plain, lora_lib.LoRAConfig(rank=4, init="zero_a", targets=("v", "down")),
                    jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(model.layers.attn.v.lora_b[...]),
                                np.asarray(plain.layers.attn.v.lora_b[...]))
  for targets, rank, match in ((("q", "v"), 4, "none of the targets"), (("down",), 2, "below")):
    with pytest.raises(ValueError, match=match):
      lora_lib.add_lora(build_model(TINY), lora_lib.LoRAConfig(
          rank=rank, init="zero_a_labels", targets=targets), jax.random.key(0), rows)
  with pytest.raises(ValueError, match="needs the task's label tokens"):
    lora_lib.add_lora(build_model(TINY), cfg, jax.random.key(0))
