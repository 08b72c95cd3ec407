"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023).

m canary examples are made up; each is included in training independently with probability 1/2.
After training, the auditor scores every canary by how much more likely its answer became
(log p_after - log p_before of the canary's answer token, so per-word priors cancel), guesses
"included" for the k+ highest scores and "excluded" for the k- lowest, and abstains on the rest.
If the run is (eps, delta)-DP for each example, the number of correct guesses is dominated by a
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 5.2); the largest eps that this
rejects at the chosen confidence is a lower bound on the true eps. A lower bound above the
claimed eps means the implementation (or its accounting) is broken.

A canary is an instruction-format example whose text is random words and whose answer is a word
unique to that canary, so that "the model learned this canary" is visible in one token's
probability.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from scipy import optimize, special, stats

from dplora_jax.data import classification as data_lib
from dplora_jax.models.tokenizer import encode
from dplora_jax.tasks import scoring as eval_lib


@dataclasses.dataclass
class Canaries:
  """m canaries and which are included.

  Attributes:
    examples: Examples of all m canaries (label i = answer word i).
    words: the m answer words.
    included: [m] bool, drawn independently with probability 1/2.
  """
  examples: data_lib.Examples
  words: tuple[str, ...]
  included: np.ndarray

  def per_client(self, num_clients: int) -> list[data_lib.Examples]:
    """The included canaries dealt round-robin to the clients."""
    idx = np.flatnonzero(self.included)
    return [self.examples.subset(idx[c::num_clients]) for c in range(num_clients)]


def _word_tokens(tokenizer) -> list[str]:
  """Lower-case alphabetic words of >= 4 letters that are one token after a space."""
  vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  out = []
  for piece in vocab:
    if piece and piece[0] == "\u0120" and piece[1:].isalpha() and piece[1:].islower() \
        and len(piece) >= 5:
      out.append(piece[1:])
  return out


def make_canaries(tokenizer, m: int, *, prompt: str, max_length: int, seed: int,
                  text_words: int = 8) -> Canaries:
  """Draws m canaries (random texts, unique one-token answers) and their inclusion bits.

  Raises:
    ValueError: m < 2, or the tokenizer has too few single-token words.
  """
  if m < 2:
    raise ValueError(f"canaries={m}; expected at least 2.")
  rng = np.random.default_rng(seed)
  words = _word_tokens(tokenizer)
  words = [w for w in words if len(encode(tokenizer, " " + w)) == 1]
  if len(words) < m + text_words:
    raise ValueError(f"the tokenizer has only {len(words)} single-token words; need more than "
                     f"canaries={m}.")
  order = rng.permutation(len(words))
  answers = tuple(words[i] for i in order[:m])
  pool = [words[i] for i in order[m:]]
  records = [{"text": " ".join(rng.choice(pool, text_words)), "label": i} for i in range(m)]
  ex = data_lib.build_examples(records, tokenizer, labels=answers, prompt=prompt,
                               max_length=max_length, source="canaries")
  return Canaries(ex, answers, rng.random(m) < 0.5)


def scores(graphdef, lora, frozen, canaries: Canaries, batch_size: int = 16) -> np.ndarray:
  """[m] log p(answer | canary prompt) under `lora` (one forward per batch)."""
  ex = canaries.examples
  out = []
  for s in range(0, len(ex), batch_size):
    rows = np.arange(s, min(len(ex), s + batch_size))
    rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # fixed shape
    sub = ex.subset(rows)
    lp = eval_lib.sequence_logprob(graphdef, lora, frozen, sub.tokens, sub.mask, sub.targets,
                                   sub.loss_mask, positions=1)  # one-token answers
    out.append(np.asarray(lp)[:min(batch_size, len(ex) - s)])
  return np.concatenate(out)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
  """P(>= v correct of r guesses) for an (eps, delta)-DP run with m canaries (Thm 5.2 bound).

  beta = P(Bin(r, q) >= v) with q = e^eps / (1 + e^eps); the delta term adds
  2 m delta max_{1<=i<=v} P(v - i <= Bin(r, q) < v) / i.
  """
  if not 0 <= v <= r <= m:
    raise ValueError(f"need 0 <= v <= r <= m; got v={v}, r={r}, m={m}.")
  q = special.expit(eps)
  beta = stats.binom.sf(v - 1, r, q)
  alpha = 0.0
  if v > 0 and delta > 0:
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P(Bin = v-1), ..., P(Bin = 0)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
  return float(min(1.0, beta + 2 * m * delta * alpha))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
  """The largest eps rejected at `confidence` given v correct of r guesses (0 if none)."""
  alpha = 1.0 - confidence
  if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
    return 0.0
  hi = 1.0
  while p_value(m, r, v, hi, delta) < alpha:
    hi *= 2
    if hi > 1e3:
      return math.inf
  return float(optimize.brentq(lambda e: p_value(m, r, v, e, delta) - alpha, 0.0, hi,
                               xtol=1e-6))


def guess(score: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
  """[m] in {+1 (included), -1 (excluded), 0 (abstain)}: top k+ and bottom k- scores."""
  order = np.argsort(-score, kind="stable")
  g = np.zeros(len(score), np.int8)
  g[order[:k_pos]] = 1
  if k_neg:
    g[order[-k_neg:]] = -1
  return g


def audit(score: np.ndarray, included: np.ndarray, *, k_pos: int, k_neg: int, delta: float,
          confidence: float = 0.95) -> dict:
  """Guesses from `score`, counts correct ones and returns the eps lower bound with its inputs."""
  m = len(score)
  if k_pos + k_neg > m:
    raise ValueError(f"k+ + k- = {k_pos + k_neg} guesses exceed the {m} canaries.")
  g = guess(score, k_pos, k_neg)
  r = int(np.sum(g != 0))
  v = int(np.sum((g == 1) & included) + np.sum((g == -1) & ~included))
  return {"epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, confidence),
          "guesses": r, "correct": v, "canaries": m, "confidence": confidence,
          "included": int(np.sum(included)), "delta": delta}


def covering_claim(cfg) -> str | None:
  """The mechanism whose guarantee covers one canary example, or None (dp.mode none).

  A canary is one example included or not. The example-level guarantee (sample, sample+client)
  covers exactly that; the paper's honest guarantee covers any change to a client's data. A
  client-level guarantee (dp.mode client) protects add/remove of a whole client: a canary changes
  a client's data, which is replace-one of a client (twice the sensitivity), so comparing with
  the client-level eps would be comparing with the wrong claim.

  Raises:
    ValueError: dp.mode = 'client'.
  """
  mode = cfg.dp.mode
  if mode == "client":
    raise ValueError("dp.mode='client' protects whole clients (add/remove), while a canary is "
                     "one example inside a client; no claim of this run covers it. Audit "
                     "dp.mode='sample' or 'sample+client' (the example-level claim) instead.")
  return {"sample": "example", "sample+client": "example", "paper": "paper"}.get(mode)


def run_audit(cfg, workdir: str, *, canaries: int = 200, confidence: float = 0.95,
              guess_fraction: float = 0.25, seed: int = 0, progress: bool = False) -> dict:
  """Trains `cfg` once with m canaries inserted and audits it; writes workdir/audit.json.

  Args:
    cfg: a validated RunConfig.
    canaries: m.
    guess_fraction: k+ = k- = floor(guess_fraction * m) guesses on each side (fixed in advance,
      so the bound needs no correction for choosing them).
    seed: the canary draw (texts, answers, inclusion bits).

  Returns:
    The audit dict (also written to workdir/audit.json).
  """
  from dplora_jax import build, train  # neither imports audit; imported here to keep audit light
  claim = covering_claim(cfg)  # refuse before training
  if not 0 < guess_fraction <= 0.5:
    raise ValueError(f"guess_fraction={guess_fraction}; expected a number in (0, 0.5].")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence}; expected a number in (0, 1).")
  model_tok = build.load_run_tokenizer(cfg)
  can = make_canaries(model_tok, canaries, prompt=cfg.data.prompt,
                      max_length=cfg.data.max_length, seed=seed)
  result = train.run(cfg, workdir, progress=progress,
                     extra_train=can.per_client(cfg.fed.num_clients))
  s = result.setup
  before = scores(s.graphdef, s.lora, s.frozen, can)
  after = scores(s.graphdef, result.lora, s.frozen, can)
  if claim is None:
    claimed, delta = math.inf, cfg.dp.delta
  else:
    spent = {m["name"]: m for m in result.summary["privacy"]}[claim]
    claimed, delta = spent["epsilon_spent"], spent["delta_spent"]
  k = int(guess_fraction * canaries)
  out = audit(after - before, can.included, k_pos=k, k_neg=k, delta=delta,
              confidence=confidence)
  out |= {"epsilon_claimed": claimed, "claim": claim, "mode": cfg.dp.mode, "seed": seed,
          "score": "log p_after(answer) - log p_before(answer)",
          "mean_score_included": float(np.mean((after - before)[can.included])),
          "mean_score_excluded": float(np.mean((after - before)[~can.included]))}
  with open(os.path.join(workdir, "audit.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out
