"""Finance: 3-way sentiment classification by the log-likelihood of each label word after a
FinGPT prompt (TFNS, FiQA-SA, Financial PhraseBank, or any {text, label} file).

The prompt and the label words are the run's `data.prompt` and `data.labels` (FinGPT's:
negative / positive / neutral, in TFNS's id order). A record's label is a label word, or an
integer that the dataset's own id order (`label_order`) turns into a word; metrics follow FinGPT
(accuracy, macro / micro / weighted F1) plus the majority-class accuracy of the evaluated set.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import special

from dplora_jax.data import classification as data_lib, io
from dplora_jax.tasks import base, metrics, scoring


@dataclasses.dataclass(frozen=True)
class SentimentTask(base.Task):
  """`label_order`: the dataset's id -> label word ("" = ids index `data.labels`)."""
  label_order: tuple[str, ...] = ()
  text_fields: tuple[str, ...] = ("text",)

  def _label(self, value, dc, where):
    is_word = isinstance(value, str) and not value.strip().lstrip("-").isdigit()
    if self.label_order and not is_word:  # the dataset's own id order
      value = self.label_order[data_lib.label_id(value, self.label_order, where)]
    return data_lib.label_id(value, tuple(dc.labels), where)

  def items(self, records, dc):
    out = []
    for i, r in enumerate(records):
      where = records.where(i)
      text = base.field(r, self.text_fields, where)
      if "label" not in r:
        raise ValueError(f"{where}: no field 'label' (fields: {sorted(r)}).")
      out.append((text, self._label(r["label"], dc, where)))
    return out

  def loss_positions(self, tokenizer, dc):
    return max(len(a) for a in data_lib.label_token_ids(tokenizer, dc.labels))

  def label_tokens(self, tokenizer, dc):
    first = tuple(int(a[0]) for a in data_lib.label_token_ids(tokenizer, dc.labels))
    if len(set(first)) < len(first):
      raise ValueError(f"optim.loss='labels': the label words {tuple(dc.labels)} do not start "
                       f"with distinct tokens ({first}); choose other data.labels or "
                       "optim.loss='lm'.")
    return first

  def item_labels(self, items):
    return np.asarray([lab for _, lab in items], np.int64)

  def train_examples(self, items, tokenizer, dc):
    records = io.Records([{"text": t, "label": lab} for t, lab in items])
    return data_lib.build_examples(records, tokenizer, labels=tuple(dc.labels), prompt=dc.prompt,
                                   max_length=dc.max_length)

  def evaluate(self, parts, tokenizer, items, dc):
    ex = self.train_examples(items, tokenizer, dc)
    answers = data_lib.label_token_ids(tokenizer, dc.labels)
    scores = scoring.label_scores(parts, ex, answers, tokenizer.pad_token_id, dc.eval_batch_size)
    out = metrics.classification_metrics(np.argmax(scores, axis=1), ex.labels, len(dc.labels))
    out["labels"] = list(dc.labels)  # the order of f1_per_label and of confusion's rows / columns
    # the mean negative log-likelihood of the gold label: over the whole vocabulary, and among the
    # label words only (the softmax over their scores: comparable with `prior_nll`, and what
    # optim.loss='labels' trains, which leaves the whole-vocabulary NLL untrained)
    gold = scores[np.arange(len(ex)), ex.labels]
    out["nll"] = float(-np.mean(gold)) if len(ex) else 0.0
    out["label_nll"] = (float(np.mean(special.logsumexp(scores, axis=1) - gold))
                        if len(ex) else 0.0)
    return out


def read_phrasebank(path: str) -> io.Records:
  """Financial PhraseBank as its authors ship it (`Sentences_50Agree.txt`: `sentence@label`
  lines, ISO-8859-1), or any other reader's format (a `datasets` directory: {sentence, label}
  with 0 negative, 1 neutral, 2 positive)."""
  if os.path.isdir(path) or not path.endswith(".txt"):
    return io.read_records(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} not found.")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")  # the original release's encoding
  items, lines = [], []
  for i, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    sentence, sep, label = line.rpartition("@")
    if not sep:
      raise ValueError(f"{path}:{i}: expected 'sentence@label' (Financial PhraseBank format).")
    items.append({"sentence": sentence.strip(), "label": label.strip()})
    lines.append(i)
  return io.Records(items, path, lines)


@dataclasses.dataclass(frozen=True)
class PhraseBankTask(SentimentTask):
  reader = staticmethod(read_phrasebank)
