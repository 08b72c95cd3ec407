"""What the frozen model already knows: a (non-private) linear probe on its hidden states.

  python -m benchmarks.feature_probe [--config configs/finance.py] [--layers 12,20,29]
      [--examples 1500] [--ranks 16,64]

For each layer L, the activations entering layer L (`lora.frozen_prefix`, the residual stream
after L blocks) of `--examples` training rows (a fixed-seed subset of the config's clients) and
of the config's held-out rows, read at the position that predicts the answer ("last") and
averaged over the prompt's positions up to it ("prompt mean": never the answer token). A
multinomial logistic regression (standardised features, fixed L2, full-batch L-BFGS via optax)
is fitted on the training rows and scored on the held-out ones (accuracy, macro F1): an upper
reference for what a probe-like adapter on those features can reach without DP. With `--ranks`,
the same probe on r Gaussian random projections of the RMS-normalised features: the input an
FFA-LoRA B factor sees through its frozen random A of rank r.

The training rows are private data in a deployment: this is a research diagnostic on public
TFNS, nothing here is released or accounted. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplora_jax import build as build_lib, lora as lora_lib
from dplora_jax.data import classification
from dplora_jax.tasks.metrics import classification_metrics
from launch import cli


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _read(graphdef, lora, frozen, tokens, mask, pos):
  """Both features of a chunk (one compile per model and chunk shape, as `tasks.scoring`)."""
  h = lora_lib.frozen_prefix(graphdef, lora, frozen, tokens, mask)
  seen = mask & (jnp.arange(mask.shape[1])[None] <= pos[:, None])
  w = seen[..., None].astype(h.dtype)
  return h[jnp.arange(h.shape[0]), pos], (h * w).sum(1) / w.sum(1)


def features(s, examples, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """([N, D] at the answer-predicting position, [N, D] mean over the prompt up to it)."""
  last, mean = [], []
  for i in range(0, len(examples), chunk):
    ex = examples.subset(np.arange(i, min(i + chunk, len(examples))))
    n = len(ex)
    pad = lambda x: np.concatenate([x, np.zeros((chunk - n,) + x.shape[1:], x.dtype)])
    pos = np.maximum(ex.prompt_len - 1, 0).astype(np.int32)
    a, b = _read(s.graphdef, s.lora, s.frozen, pad(ex.tokens), pad(ex.mask), pad(pos))
    last.append(np.asarray(a)[:n])
    mean.append(np.asarray(b)[:n])
  return np.concatenate(last), np.concatenate(mean)


def probe(x_train, y_train, x_eval, num_labels: int, l2: float, steps: int = 300) -> np.ndarray:
  """Predicted labels of x_eval by an L2-regularised multinomial logistic regression."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  xt, xe = jnp.asarray((x_train - mu) / sd), jnp.asarray((x_eval - mu) / sd)
  yt = jnp.asarray(y_train)
  params = (jnp.zeros((xt.shape[1], num_labels)), jnp.zeros((num_labels,)))

  def loss(p):
    logits = xt @ p[0] + p[1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()
    return nll + 0.5 * l2 * jnp.sum(p[0] ** 2)

  opt = optax.lbfgs()
  state = opt.init(params)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(p, st):
    v, g = value_and_grad(p, state=st)
    upd, st = opt.update(g, st, p, value=v, grad=g, value_fn=loss)
    return optax.apply_updates(p, upd), st

  for _ in range(steps):
    params, state = step(params, state)
  return np.asarray(jnp.argmax(xe @ params[0] + params[1], -1))


def _rms(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit RMS (what a LoRA factor of a normed layer input sees, before its gain)."""
  return x / np.sqrt((x ** 2).mean(1, keepdims=True))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/finance.py:examples=9500")
  p.add_argument("--layers", default="12,20,29")
  p.add_argument("--examples", type=int, default=1500)
  p.add_argument("--ranks", default="16,64", help="random projections (FFA's frozen A); '' = none")
  p.add_argument("--l2", type=float, default=0.03, help="L2 weight on the standardised probe")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  ranks = [int(r) for r in args.ranks.split(",") if r]
  print("| layer | feature | dims | accuracy | macro F1 | features s |")
  print("|---|---|---|---|---|---|")
  for layer in (int(x) for x in args.layers.split(",")):
    cfg = cli.load_config(args.config, {"lora.first_layer": str(layer), "dp.mode": "none"})
    s = build_lib.build(cfg)
    train = classification.concat(s.clients)
    pick = np.random.default_rng(args.seed).permutation(len(train))[:args.examples]
    train = train.subset(np.sort(pick))
    held = s.task.train_examples(s.eval_items, s.tokenizer, cfg.data)
    num_labels = len(cfg.data.labels)
    t0 = time.time()
    (tr_last, tr_mean), (ev_last, ev_mean) = features(s, train), features(s, held)
    secs = time.time() - t0
    width = tr_last.shape[1]
    projections = {r: np.random.default_rng(args.seed).normal(size=(width, r)).astype(np.float32)
                   for r in ranks}
    for name, xt, xe in (("last", tr_last, ev_last), ("prompt mean", tr_mean, ev_mean)):
      views = [(str(width), xt, xe)]
      views += [(f"{r} (random)", _rms(xt) @ a, _rms(xe) @ a) for r, a in projections.items()]
      for dims, ft, fe in views:
        m = classification_metrics(probe(ft, train.labels, fe, num_labels, args.l2),
                                   held.labels, num_labels)
        print(f"| {layer} | {name} | {dims} | {m['accuracy']:.3f} | {m['f1_macro']:.3f} | "
              f"{secs:.0f} |", flush=True)


if __name__ == "__main__":
  main()
