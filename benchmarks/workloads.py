"""The two benchmark workloads, identical for every implementation (same tokens, same loss).

- "demo": the classification fine-tune of `make demo`: a prompt, and the loss on its answer
  token only (the last position), with the LM head computed at that position alone.
- "full": a full-sequence causal-LM loss (every position's next token; head at every position).
"""

from __future__ import annotations

import numpy as np

WORKLOADS = ("demo", "full")

# Random-init architectures for `--model random:NAME` (no weights read: the step's cost depends on
# the shapes only). smollm2-135m is SmolLM2-135M's shape (for machines without its 98 MB GGUF),
# llama-1b Llama-3.2-1B's (the "1B-class" model); tiny is for smoke checks on a CPU.
RANDOM_SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
                         tie_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                     tie_embeddings=True, max_position_embeddings=131072),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, tie_embeddings=True),
}


def random_model_config(name: str, *, dtype: str, param_dtype: str):
  """The ModelConfig of `random:NAME` (a Llama of RANDOM_SHAPES[NAME])."""
  from dplora_jax.models import ModelConfig
  if name not in RANDOM_SHAPES:
    raise ValueError(f"--model random:{name}; expected one of "
                     f"{['random:' + k for k in RANDOM_SHAPES]}.")
  return ModelConfig(family="llama", dtype=dtype, param_dtype=param_dtype, **RANDOM_SHAPES[name])


def batch(workload: str, vocab: int, b: int, t: int, seed: int = 0) -> dict:
  """dict of numpy arrays: tokens, mask, targets [b, t] and loss_mask [b, t] (bool)."""
  if workload not in WORKLOADS:
    raise ValueError(f"workload {workload!r}; expected one of {WORKLOADS}.")
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = np.zeros((b, t), bool)
  if workload == "demo":
    loss_mask[:, t - 2] = True  # predicts the last token (the answer) from the prompt
  else:
    loss_mask[:, :t - 1] = True
  return {"tokens": tokens, "mask": np.ones((b, t), bool), "targets": targets,
          "loss_mask": loss_mask}


def head_positions(workload: str, t: int) -> int:
  """Positions per example whose logits the loss needs."""
  return 1 if workload == "demo" else t


def add_shape_args(parser, model: bool = True):
  """The flags every benchmark script shares (model, workload, shape, repeats)."""
  if model:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a path or alias, or random:NAME (%s)" % ", ".join(RANDOM_SHAPES))
  parser.add_argument("--workload", default="demo", choices=WORKLOADS)
  parser.add_argument("--dp", action="store_true")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)


def jax_steps(graphdef, batch_size: int, microbatch: int, positions: int, lr: float = 0.1):
  """(non-private step, DP step) of dplora_jax, each `(lora, frozen, batch, key) -> lora`.

  Non-private: jax.grad of the batch-mean loss. DP: `client.privatized_gradient` (per-example
  vmap in microbatches, clip C = 1, noise sigma = 1, divisor B). Both take an SGD step.
  """
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from dplora_jax.dp.mechanisms import DPSGD
  from dplora_jax.federated import client as client_lib
  tx = optax.sgd(lr)
  valid = np.ones((batch_size,), bool)

  def nonprivate(lora, frozen, batch, key):
    def loss(l):
      fn = functools.partial(client_lib.example_loss, positions=positions)
      per = jax.vmap(fn, in_axes=(None, None, None, 0, 0, 0, 0, 0))(
          graphdef, l, frozen, batch["tokens"], batch["mask"], batch["targets"],
          batch["loss_mask"], batch.get("hidden"))
      return jnp.mean(per)
    updates, _ = tx.update(jax.grad(loss)(lora), tx.init(lora), lora)
    return optax.apply_updates(lora, updates)

  spec = client_lib.ClientSpec(
      microbatch=min(microbatch, batch_size), local_steps=1, loss_positions=positions,
      dpsgd=DPSGD(clip_norm=1.0, noise_multiplier=1.0, divisor=float(batch_size)))

  def private(lora, frozen, batch, key):
    g, _ = client_lib.privatized_gradient(graphdef, spec, lora, frozen, batch, valid, key)
    updates, _ = tx.update(g, tx.init(lora), lora)
    return optax.apply_updates(lora, updates)

  return nonprivate, private, spec
