"""Sparse-position logits: the head and softmax only at answer positions give the same loss,
gradients and evaluation scores as the full computation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplora_jax import lora as lora_lib, losses
from dplora_jax.federated import client as client_lib
from dplora_jax.models import build_model
from dplora_jax.tasks import scoring as eval_lib
from tests import tiny


def _answers(ex, k):
  """The same examples with k answer tokens each (k in 1..3)."""
  lm = np.zeros_like(ex["loss_mask"])
  for i, row in enumerate(ex["loss_mask"]):
    lm[i, np.flatnonzero(row)[:k]] = True
  return dict(ex, loss_mask=lm)


def test_answer_positions_are_the_first_p_loss_positions():
  lm = jnp.array([[0, 1, 1, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
  pos, valid = losses.answer_positions(lm, 3)
  np.testing.assert_array_equal(pos, [[1, 2, 4], [3, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  # more positions than the row's tokens (a length bucket narrower than max_answer_tokens): T
  pos, valid = losses.answer_positions(lm, 8)
  np.testing.assert_array_equal(pos, [[1, 2, 4, 0, 0], [3, 0, 0, 0, 0], [0] * 5])
  np.testing.assert_array_equal(valid.sum(1), [3, 1, 0])


def test_token_logprob_equals_the_log_softmax_at_the_target_with_its_gradient():
  # the reference: log_softmax over the vocabulary, then the target's entry
  logits = jax.random.normal(jax.random.key(0), (3, 5, 97)) * 4.0
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 97)
  ref = lambda x: jnp.take_along_axis(jax.nn.log_softmax(x, -1), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.token_logprob(logits, targets), ref(logits), atol=1e-5)
  w = jax.random.normal(jax.random.key(2), (3, 5))
  g = jax.grad(lambda x: jnp.sum(w * losses.token_logprob(x, targets)))(logits)
  g_ref = jax.grad(lambda x: jnp.sum(w * ref(x)))(logits)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_logits_at_positions_equal_the_full_logits_there(family):
  arch = dataclasses.replace(tiny.ARCH, family=family, num_kv_heads=tiny.ARCH.num_heads) \
      if family == "gpt2" else tiny.ARCH
  model = build_model(arch, seed=1)
  ex = tiny.examples(3)
  pos = jnp.array([[0, 5, 7], [2, 2, 9], [11, 1, 3]], jnp.int32)
  full = model(ex["tokens"], ex["mask"])
  sparse = model(ex["tokens"], ex["mask"], logits_at=pos)
  np.testing.assert_allclose(sparse, jnp.take_along_axis(full, pos[..., None], axis=1),
                             atol=1e-6)


@pytest.mark.parametrize("answer_tokens", [1, 3])
def test_sparse_loss_and_gradients_equal_the_full_computation(answer_tokens):
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = _answers(tiny.examples(4), answer_tokens)
  args = [ex[f] for f in ("tokens", "mask", "targets", "loss_mask")]

  def per_example(positions):  # one example's loss and LoRA gradient, for each of the 4
    loss = functools.partial(client_lib.example_loss, positions=positions)
    return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=1),
                            in_axes=(None, None, None, 0, 0, 0, 0)), static_argnums=0)

  full, g_full = per_example(0)(graphdef, lora, frozen, *args)
  # 3 positions, and more positions than the rows have tokens (a narrow length bucket under a
  # large max_answer_tokens: this once failed to trace, WinoGrande at 32 answer tokens, width 24)
  for p in (3, args[0].shape[1] + 8):
    sparse, g_sparse = per_example(p)(graphdef, lora, frozen, *args)
    np.testing.assert_allclose(sparse, full, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sparse)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_sparse_eval_scores_equal_the_full_computation():
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = _answers(tiny.examples(5), 2)
  sparse = eval_lib.sequence_logprob(graphdef, lora, frozen, ex["tokens"], ex["mask"],
                                     ex["targets"], ex["loss_mask"], positions=2)
  full = eval_lib.sequence_logprob(graphdef, lora, frozen, ex["tokens"], ex["mask"],
                                   ex["targets"], ex["loss_mask"])
  np.testing.assert_allclose(sparse, full, atol=1e-5)
  prompt_len = jnp.array([4, 6, 7, 9, 12], jnp.int32)
  cand = jnp.array([[3, 17, 40], [3, 17, 40], [1, 2, 2], [40, 3, 9], [0, 5, 17]])  # per row
  got = eval_lib._next_token_logprobs(graphdef, lora, frozen, ex["tokens"], ex["mask"],
                                      prompt_len, cand)
  logits = jax.nn.log_softmax(
      lora_lib.apply(graphdef, lora, frozen, ex["tokens"], ex["mask"]), -1)
  want = logits[jnp.arange(5), prompt_len - 1][jnp.arange(5)[:, None], cand]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_label_loss_is_the_softmax_over_the_label_tokens_at_the_first_answer_position():
  graphdef, lora, frozen = tiny.model_and_lora()
  ex = _answers(tiny.examples(4, seed=3), 1)
  labels = (5, 17, 40)
  for i in range(4):
    first = int(np.flatnonzero(ex["loss_mask"][i])[0])
    targets = ex["targets"][i].copy()
    targets[first] = labels[i % 3]  # the gold label word's token
    full = np.asarray(lora_lib.apply(graphdef, lora, frozen, ex["tokens"][i][None],
                                     ex["mask"][i][None])[0, first], np.float64)
    z = full[list(labels)]
    expected = -(z[i % 3] - np.log(np.sum(np.exp(z))))  # by hand, in float64
    got = client_lib.example_loss(graphdef, lora, frozen, ex["tokens"][i], ex["mask"][i],
                                  targets, ex["loss_mask"][i], positions=1, label_tokens=labels)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # the LM loss of the same example is the softmax over the whole vocabulary instead
    lm = client_lib.example_loss(graphdef, lora, frozen, ex["tokens"][i], ex["mask"][i],
                                 targets, ex["loss_mask"][i], positions=1)
    assert float(lm) > float(got)


def test_label_loss_needs_a_classification_task_and_loss_positions():
  from dplora_jax import build, config as config_lib, tasks
  from configs import tiny as tiny_config
  c = tiny_config.get_config()
  with c.unlocked():
    c.optim.loss = "labels"
    c.data.task = "medquad"
  cfg = config_lib.from_config_dict(c)
  with pytest.raises(ValueError, match="optim.loss='labels' needs a classification task"):
    build.loss_labels(cfg, tasks.get("medquad"), None)
  with pytest.raises(ValueError, match="a label loss needs loss positions"):
    client_lib.ClientSpec(microbatch=2, local_steps=1, label_tokens=(1, 2))
  with pytest.raises(ValueError, match="optim.loss"):
    config_lib.OptimConfig(loss="softmax")


def test_a_run_with_the_label_loss_hands_the_label_tokens_to_its_client_step():
  from dplora_jax import build, config as config_lib
  from dplora_jax.data.classification import label_token_ids
  from dplora_jax.federated import round as round_lib
  from configs import tiny as tiny_config
  c = tiny_config.get_config()
  with c.unlocked():
    c.optim.loss = "labels"
  cfg = config_lib.from_config_dict(c)
  s = build.build(cfg)
  words = label_token_ids(s.tokenizer, cfg.data.labels)
  assert s.label_tokens == tuple(int(w[0]) for w in words) and len(set(s.label_tokens)) == 3
  # every training example's first answer token is one of them (else its loss would be 0)
  for ex in s.clients:
    first = ex.targets[np.arange(len(ex)), np.argmax(ex.loss_mask, axis=1)]
    assert set(first.tolist()) <= set(s.label_tokens)
  spec, _, _ = round_lib.run_round_step(cfg, s.plan, s.graphdef, s.loss_positions,
                                        round_lib.make_mesh(1), s.label_tokens)
  assert spec.label_tokens == s.label_tokens
