"""Task metrics: classification accuracy and F1 variants (FinGPT's), multiple-choice accuracy
(lm-evaluation-harness's acc and acc_norm), ROUGE (Google's `rouge-score`)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def confusion(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
  """[num_labels, num_labels] counts, rows the true label, columns the prediction."""
  m = np.zeros((num_labels, num_labels), np.int64)
  np.add.at(m, (np.asarray(labels, int), np.asarray(pred, int)), 1)
  return m


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
  """Accuracy; macro, micro and weighted F1 (scikit-learn's definitions: a class with no true
  and no predicted example has F1 0); the majority-class accuracy of these labels, and their
  label-prior NLL (the entropy of their label frequencies, in nats: the held-out NLL of a model
  that knows only how often each label occurs here, so an NLL below it is learned from the text);
  each label's F1 (`f1_per_label`, in label order) and the confusion matrix (`confusion`: rows the
  true label, columns the prediction), which say which class a macro F1 misses."""
  m = confusion(pred, labels, num_labels)
  tp = np.diag(m).astype(float)
  fp, fn = m.sum(0) - tp, m.sum(1) - tp
  denom = 2 * tp + fp + fn
  f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
  support = m.sum(1).astype(float)
  n = int(m.sum())
  micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
  return {"accuracy": float(tp.sum() / n) if n else 0.0,
          "f1_macro": float(f1.mean()),
          "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
          "f1_weighted": float((f1 * support).sum() / max(support.sum(), 1.0)),
          "majority_accuracy": float(support.max() / n) if n else 0.0,
          "prior_nll": _entropy(support),
          "n": n,
          "f1_per_label": [float(v) for v in f1],
          "confusion": m.tolist()}


def _entropy(counts: np.ndarray) -> float:
  """Entropy (nats) of the frequencies `counts` (0 for no rows)."""
  return float(stats.entropy(counts)) if counts.sum() > 0 else 0.0


def choice_metrics(scores: np.ndarray, lengths: np.ndarray, gold: np.ndarray) -> dict:
  """acc: argmax of log-likelihood; acc_norm: argmax of log-likelihood per character of the
  choice (lm-evaluation-harness); both [N, C] arrays, gold [N]."""
  n = len(gold)
  if n == 0:
    return {"acc": 0.0, "acc_norm": 0.0, "n": 0}
  acc = np.argmax(scores, axis=1) == gold
  acc_norm = np.argmax(scores / np.maximum(lengths, 1), axis=1) == gold
  return {"acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()),
          "majority_accuracy": float(np.bincount(gold).max() / n), "n": int(n)}


def rouge(predictions: list[str], references: list[str]) -> dict:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures in [0, 1] (prediction against reference, Porter
  stemming), by Google's `rouge-score`."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  for p, r in zip(predictions, references):
    for k, v in scorer.score(r, p).items():
      totals[k] += v.fmeasure
  n = max(len(predictions), 1)
  return {k: v / n for k, v in totals.items()}
