"""General: multiple choice by log-likelihood, lm-evaluation-harness conventions.

Each item is contexts x continuations with a gold index; a choice's score is
log p(continuation | context), `acc` takes the argmax and `acc_norm` the argmax per character of
the choice. Training uses the gold choice: `context + continuation`, the loss on the
continuation. The one deviation from the harness: a continuation longer than
`data.max_answer_tokens` is cut to it (the shapes are fixed), and a long context loses tokens from
its start.

- BoolQ: `{passage}\\nQuestion: {question}?\\nAnswer:` then ` no` / ` yes` (label 1 = yes).
- PIQA: `Question: {goal}\\nAnswer:` then ` {choice}`.
- WinoGrande (partial scoring): context `sentence[:blank] + option`, continuation the suffix
  after the blank, the same for both options.

Only validation files ship; `PATH::train` and `PATH::test` are a fixed-seed split of one file
(`data.io.SPLIT_SEED`, the task's `test_fraction`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dplora_jax.data import classification as data_lib
from dplora_jax.models.tokenizer import encode
from dplora_jax.tasks import base, metrics, scoring


@dataclasses.dataclass(frozen=True)
class Item:
  contexts: tuple[str, ...]  # one per choice (the same string repeated unless partial scoring)
  continuations: tuple[str, ...]
  gold: int


def _gold(r, where, num_choices):
  if "label" not in r:
    raise ValueError(f"{where}: no field 'label' (fields: {sorted(r)}).")
  v = r["label"]
  if isinstance(v, bool):
    v = int(v)
  if isinstance(v, str) and v.strip().lstrip("-").isdigit():
    v = int(v)
  if isinstance(v, str) and v.strip().lower() in ("true", "false"):
    v = int(v.strip().lower() == "true")
  if not isinstance(v, int) or not 0 <= v < num_choices:
    raise ValueError(f"{where}: label {v!r}; expected an index 0..{num_choices - 1}.")
  return v


def _choices(r, where):
  ch = r.get("choices")
  if ch is None and "sol1" in r:  # the original PIQA / WinoGrande field names
    ch = [r["sol1"], r["sol2"]]
  if ch is None and "option1" in r:
    ch = [r["option1"], r["option2"]]
  if not isinstance(ch, (list, tuple)) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
    raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings "
                     f"(fields: {sorted(r)}).")
  return tuple(ch)


@dataclasses.dataclass(frozen=True)
class ChoiceTask(base.Task):
  style: str = "piqa"  # boolq, piqa or winogrande
  metric: str = "acc"

  def _item(self, r, where) -> Item:
    if self.style == "boolq":
      passage = base.field(r, ("passage",), where)
      question = base.field(r, ("question",), where)
      ctx = f"{passage}\nQuestion: {question}?\nAnswer:"
      return Item((ctx, ctx), (" no", " yes"), _gold(r, where, 2))
    if self.style == "piqa":
      goal = base.field(r, ("goal",), where)
      ch = _choices(r, where)
      ctx = f"Question: {goal}\nAnswer:"
      return Item((ctx,) * len(ch), tuple(" " + c for c in ch), _gold(r, where, len(ch)))
    sentence = base.field(r, ("sentence",), where)
    if sentence.count("_") != 1:
      raise ValueError(f"{where}: field 'sentence' must hold exactly one blank '_'.")
    ch = _choices(r, where)
    if "answer" in r and "label" not in r:  # the original WinoGrande: answer "1" / "2"
      r = dict(r, label=int(r["answer"]) - 1)
    blank = sentence.index("_")
    suffix = " " + sentence[blank + 1:].strip()
    return Item(tuple(sentence[:blank] + c for c in ch), (suffix,) * len(ch),
                _gold(r, where, len(ch)))

  def items(self, records, dc):
    return [self._item(r, records.where(i)) for i, r in enumerate(records)]

  def item_labels(self, items):
    return np.asarray([it.gold for it in items], np.int64)

  def _request(self, tokenizer, ctx: str, cont: str, dc):
    c = encode(tokenizer, cont)[:dc.max_answer_tokens]
    x = encode(tokenizer, ctx)
    keep = dc.max_length - len(c)
    return (x[len(x) - keep:] if len(x) > keep else x), c

  def train_examples(self, items, tokenizer, dc):
    prompts, answers = [], []
    for it in items:
      x, c = self._request(tokenizer, it.contexts[it.gold], it.continuations[it.gold], dc)
      prompts.append(x)
      answers.append(c)
    return data_lib.pack(prompts, answers, [it.gold for it in items], dc.max_length,
                         tokenizer.pad_token_id)

  def evaluate(self, parts, tokenizer, items, dc):
    reqs, shape = [], []
    for it in items:
      shape.append(len(it.continuations))
      reqs += [self._request(tokenizer, x, c, dc) for x, c in zip(it.contexts, it.continuations)]
    lp = scoring.continuation_logprobs(parts, reqs, tokenizer.pad_token_id, dc.max_length,
                                       dc.eval_batch_size)
    width = max(shape) if shape else 2
    scores = np.full((len(items), width), -np.inf)
    chars = np.ones((len(items), width))
    gold = np.asarray([it.gold for it in items], int)
    at = 0
    for i, it in enumerate(items):
      k = len(it.continuations)
      scores[i, :k] = lp[at:at + k]
      # lm-eval normalises by the choice's length in characters (without the " " delimiter)
      chars[i, :k] = [len(c) - c.startswith(" ") for c in it.continuations]
      at += k
    out = metrics.choice_metrics(scores, chars, gold)
    out["nll"] = float(-np.mean(scores[np.arange(len(items)), gold])) if len(items) else 0.0
    return out
