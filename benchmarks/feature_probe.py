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

With `--dp-eps 8,4,...`, the same read-out trained privately: DP-SGD on a softmax regression
(Poisson rate `--dp-rate`, `--dp-steps` steps, per-example clip `--dp-clip`, the repo's clip and
Gaussian release, sigma calibrated by PLD to eps at delta 1e-5 for the whole composition), on the
unit-normed rows (a per-row map) either uncentred, centred by their *private* mean
(`dp.statistics.private_mean`, noise multiplier `--centre-sigma`, its event composed into eps), or
centred by the exact training mean (a reference that is not private: the mean is unaccounted).
Example-level; `--dp-noise-at server`: one trusted party adds the noise to the sum of every
client's rows (the aggregator mode's trust), `client`: each of the config's K clients noises its
own sums (the default local release: K times the variance on the total, simulated as one draw of
that variance); hyperparameters fixed in advance, not tuned on the held-out rows.

The training rows are private data in a deployment: this is a research diagnostic on public
TFNS. The non-private probe and the "mean share" column are unnoised statistics of them, never
released by a run; the DP read-out's eps is as stated above. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dplora_jax import build as build_lib, lora as lora_lib
from dplora_jax.data import classification
from dplora_jax.dp import accounting, clipping, mechanisms, statistics
from dplora_jax.dp.randomness import DPRandomness
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


CENTRES = ("none", "private mean", "exact mean (not private)")


@functools.partial(jax.jit, static_argnames=("num_labels", "steps"))
def _dp_sgd(key, z, labels, num_labels: int, steps: int, rate, sigma, clip, lr, momentum):
  """DP-SGD on a softmax regression with bias: per-example gradients [z, 1] (x) (p - y) in closed
  form (norm |[z, 1]| |p - y|), each Poisson-sampled at `rate`, clipped to `clip`, summed and
  released with N(0, sigma^2 clip^2) per step, divided by the expected batch; heavy-ball."""
  n, d = z.shape
  z1 = jnp.concatenate([z, jnp.ones((n, 1), z.dtype)], 1)
  onehot = jax.nn.one_hot(labels, num_labels)
  w0 = jnp.zeros((d + 1, num_labels), jnp.float32)

  def step(carry, k):
    w, v = carry
    k_sample, k_noise = jax.random.split(k)
    keep = jax.random.bernoulli(k_sample, rate, (n,))
    r = jax.nn.softmax(z1 @ w) - onehot
    factors = clipping.clip_factors(
        jnp.linalg.norm(z1, axis=1) * jnp.linalg.norm(r, axis=1), clip, keep)
    g = mechanisms.DPSGD(clip, sigma, rate * n).release(k_noise, z1.T @ (r * factors[:, None]))
    v = momentum * v + g
    return (w - lr * v, v), None

  (w, _), _ = jax.lax.scan(step, (w0, w0), jax.random.split(key, steps))
  return w


@functools.lru_cache(maxsize=None)
def _step_sigma(epsilon: float, delta: float, rate: float, steps: int,
                centre_sigma: float | None) -> float:
  """The steps' sigma (PLD) for eps over `steps` sampled Gaussians, after the private mean's
  release when `centre_sigma` is given (0 for eps inf). Cached: the uncentred and exact-mean
  read-outs share it, and every placement and feature repeats it."""
  if np.isinf(epsilon):
    return 0.0
  prior = [] if centre_sigma is None else [statistics.mean_event(centre_sigma)]
  if prior:
    spent = accounting.epsilon(prior[0], delta, "pld")
    if spent >= epsilon:
      raise ValueError(f"--centre-sigma={centre_sigma}: the centre's release alone spends eps "
                       f"{spent:.2f} >= {epsilon:g} at delta {delta:g}; raise it.")
  return accounting.calibrate(
      lambda s: accounting.composed_event(prior + [accounting.dpsgd_event(rate, s, steps)]),
      epsilon, delta, "pld", field="--dp-eps")


def dp_probe(key, x_train, y_train, x_eval, num_labels: int, *, epsilon: float, centre: str,
             rate: float, steps: int, clip: float, lr: float, momentum: float,
             centre_sigma: float, noisers: int = 1,
             delta: float = 1e-5) -> tuple[np.ndarray, float]:
  """(predicted labels of x_eval, sigma of the steps) of `_dp_sgd` on the unit-normed rows,
  centred as `centre` (one of CENTRES); eps (inf: no noise, clip kept) covers the private mean's
  release and every step (PLD). `noisers` parties each add the calibrated noise to their own
  part of every sum (1: a trusted aggregator; K: each client): the total's noise has `noisers`
  times the variance, each example's guarantee is that of its own party's release."""
  if centre not in CENTRES:
    raise ValueError(f"centre={centre!r}; expected one of {CENTRES}.")
  k_mean, k_sgd = jax.random.split(key)
  u, ue = statistics.unit_rows(x_train), statistics.unit_rows(x_eval)
  sigma = _step_sigma(epsilon, delta, rate, steps,
                      centre_sigma if centre == "private mean" else None)
  if centre == "none":
    c = jnp.zeros(u.shape[1])
  elif centre == "private mean":
    c = statistics.private_mean(k_mean, x_train, centre_sigma * np.sqrt(noisers))
  else:
    c = u.mean(0)
  # rows of norm 1 have E|u - mean|^2 = 1 - |mean|^2: the centred rows' scale, from the release
  scale = 1.0 if centre == "none" else jnp.sqrt(jnp.maximum(1.0 - jnp.sum(c ** 2), 1e-4))
  w = _dp_sgd(k_sgd, (u - c) / scale, jnp.asarray(y_train), num_labels, steps, rate,
              sigma * np.sqrt(noisers), clip, lr, momentum)
  z = (ue - c) / scale
  logits = jnp.concatenate([z, jnp.ones((z.shape[0], 1))], 1) @ w
  return np.asarray(jnp.argmax(logits, -1)), sigma


def mean_share(x: np.ndarray) -> float:
  """|mean of the unit-normed rows|^2: the share of each row's squared norm that all rows share."""
  return float(jnp.sum(statistics.unit_rows(x).mean(0) ** 2))


ATTENTION_NORM = {"llama": "attn_norm", "gpt2": "ln_1"}  # the norm in front of q / k / v


@functools.partial(jax.jit, static_argnames=("graphdef", "norm_graphdef"))
def _attention_input(graphdef, lora, frozen, norm_graphdef, norm_state, tokens, mask):
  return nnx.merge(norm_graphdef, norm_state)(
      lora_lib.frozen_prefix(graphdef, lora, frozen, tokens, mask))


def attention_input_share(s, examples, layer: int) -> tuple[float, float]:
  """(mean share of the tokens, mean share of each example's mean over its tokens) of the input
  of layer `layer`'s q / k / v (its attention norm applied to `frozen_prefix`): the rows a LoRA A
  factor there multiplies. `s.lora` must be attached with `first_layer=layer`."""
  model = nnx.merge(s.graphdef, s.lora, s.frozen)
  norm_graphdef, norm_state = nnx.split(getattr(model.layers, ATTENTION_NORM[model.family]))
  norm_state = jax.tree.map(lambda a: a[layer], norm_state)
  x = np.asarray(_attention_input(s.graphdef, s.lora, s.frozen, norm_graphdef, norm_state,
                                  examples.tokens, examples.mask))
  mask = np.asarray(examples.mask).astype(bool)
  means = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return mean_share(x[mask]), mean_share(means)


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
  p.add_argument("--input-share", type=int, default=0, help="N > 0: the mean share of the q / k / v "
                 "input (tokens, and each example's token mean) on N training rows")
  p.add_argument("--dp-eps", default="", help="eps list of the DP probe ('inf' = no noise); '' = none")
  p.add_argument("--dp-rate", type=float, default=0.1)
  p.add_argument("--dp-steps", type=int, default=300)
  p.add_argument("--dp-clip", type=float, default=1.0)
  p.add_argument("--dp-lr", type=float, default=2.0)
  p.add_argument("--dp-momentum", type=float, default=0.9)
  p.add_argument("--centre-sigma", type=float, default=4.0, help="noise multiplier of the private mean")
  p.add_argument("--dp-noise-at", default="server", help="server (trusted aggregator), client "
                 "(each client noises its own sums), or both, comma-separated")
  p.add_argument("--dp-seed", type=int, default=-1, help="-1: OS entropy (secret), as a run's")
  args = p.parse_args(argv)
  ranks = [int(r) for r in args.ranks.split(",") if r]
  dp_eps = [float(e) for e in args.dp_eps.split(",") if e]
  noise_at = args.dp_noise_at.split(",")
  if not set(noise_at) <= {"server", "client"}:
    p.error(f"--dp-noise-at={args.dp_noise_at!r}: expected server, client or server,client")
  dp_key = DPRandomness(args.dp_seed).noise_key
  dp_rows, share_rows = [], []
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
    if args.input_share:
      rows = min(args.input_share, len(train))
      tokens, examples = attention_input_share(s, train.subset(np.arange(rows)), layer)
      share_rows.append(f"| {layer} | {rows} | {tokens:.3f} | {examples:.3f} |")
    t0 = time.time()
    (tr_last, tr_mean), (ev_last, ev_mean) = features(s, train), features(s, held)
    secs = time.time() - t0
    width = tr_last.shape[1]
    projections = {r: np.random.default_rng(args.seed).normal(size=(width, r)).astype(np.float32)
                   for r in ranks}
    for name, xt, xe in (("last", tr_last, ev_last), ("prompt mean", tr_mean, ev_mean)):
      share = mean_share(xt) if dp_eps else 0.0
      views = [(str(width), xt, xe)]
      views += [(f"{r} (random)", _rms(xt) @ a, _rms(xe) @ a) for r, a in projections.items()]
      for dims, ft, fe in views:
        m = classification_metrics(probe(ft, train.labels, fe, num_labels, args.l2),
                                   held.labels, num_labels)
        print(f"| {layer} | {name} | {dims} | {m['accuracy']:.3f} | {m['f1_macro']:.3f} | "
              f"{secs:.0f} |", flush=True)
      for eps, where, centre in itertools.product(dp_eps, noise_at, CENTRES):
        if np.isinf(eps) and where == "client":
          continue  # no noise: the placement does not matter
        dp_key, k = jax.random.split(dp_key)
        row = f"| {layer} | {name} | {share:.3f} | {eps:g} | {where} | {centre} "
        try:
          pred, sigma = dp_probe(k, xt, train.labels, xe, num_labels, epsilon=eps, centre=centre,
                                 rate=args.dp_rate, steps=args.dp_steps, clip=args.dp_clip,
                                 lr=args.dp_lr, momentum=args.dp_momentum,
                                 centre_sigma=args.centre_sigma,
                                 noisers=len(s.clients) if where == "client" else 1)
        except ValueError as e:  # an eps the plan cannot reach: say so in its row
          dp_rows.append(row + f"| - | unreachable: {e} | - |")
          continue
        m = classification_metrics(pred, held.labels, num_labels)
        dp_rows.append(row + f"| {sigma:.3f} | {m['accuracy']:.3f} | {m['f1_macro']:.3f} |")
  if share_rows:
    print("\nMean share of the q / k / v input (unit rows, |mean|^2)")
    print("| layer | rows | per token | per example (its token mean) |")
    print("|---|---|---|---|")
    print("\n".join(share_rows))
  if dp_rows:
    print(f"\nDP probe: rate {args.dp_rate}, {args.dp_steps} steps, clip {args.dp_clip}, lr "
          f"{args.dp_lr}, momentum {args.dp_momentum}, private mean sigma {args.centre_sigma}, "
          f"delta 1e-5 (PLD), {len(train)} training rows")
    print("| layer | feature | mean share | eps | noise at | centre | sigma | accuracy | macro F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(dp_rows))


if __name__ == "__main__":
  main()
