"""What every task provides: its data sources, training examples and evaluation.

A task turns records (dicts read by `data.io`) into items, items into training `Examples`
(`prompt + answer`, the loss on the answer tokens), and evaluates a model on held-out records.
Everything a task needs from the run is in `DataConfig` (max_length, labels, prompt,
max_answer_tokens, eval_batch_size, max_new_tokens).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dplora_jax.data import io
from dplora_jax.data.classification import Examples
from dplora_jax.models.tokenizer import encode


@dataclasses.dataclass(frozen=True)
class Task:
  """A named task.

  Attributes:
    name: registry name.
    domain: finance, general or medical.
    kind: sentiment, choice or qa.
    train_source: default training data (`PATH` or `PATH::train`; packaged names resolve to the
      package's copies); "" when the task is evaluation-only.
    eval_source: default held-out data; "" when the user must give a path (data whose license
      forbids redistribution is never shipped).
    test_fraction: the held-out share of `PATH::test` (fixed seed, `data.io.SPLIT_SEED`).
    metric: the headline metric key.
    about: one line for `--help` and errors.
  """
  name: str
  domain: str
  kind: str
  train_source: str = ""
  eval_source: str = ""
  test_fraction: float = 0.0
  metric: str = "accuracy"
  about: str = ""

  def read(self, spec: str, role: str) -> io.Records:
    """The records of `spec` (or the task's default source for role 'train' / 'eval')."""
    default = self.train_source if role == "train" else self.eval_source
    spec = spec or default
    if not spec:
      key = "data.train_file" if role == "train" else "data.eval_file (or --file)"
      raise ValueError(f"task {self.name!r} ships no {role} data ({self.about}); give a path "
                       f"in {key}.")
    records = io.read_source(spec, self.test_fraction, self.reader)
    if not records:
      raise ValueError(f"{records.source}: no records (an empty {role} file).")
    return records

  reader = staticmethod(io.read_records)

  def heldout(self, spec: str, dc) -> tuple[list, str]:
    """(validated items, source) of the held-out data `spec` (or the task's default), cut to the
    fixed subset of `dc.eval_examples` rows: the same rows for every run and for launch.eval."""
    records = io.subsample(self.read(spec, "eval"), dc.eval_examples, io.EVAL_SUBSET_SEED)
    return self.items(records, dc), records.source

  # --- what each kind implements -------------------------------------------------------------
  def items(self, records: io.Records, dc) -> list:
    """Validated items of the records. Raises ValueError naming file:line and field."""
    raise NotImplementedError

  def loss_positions(self, tokenizer, dc) -> int:
    """P: the most answer tokens of a training example (public: from the config)."""
    return dc.max_answer_tokens

  def label_tokens(self, tokenizer, dc) -> tuple[int, ...]:
    """The first token of each label word, for `optim.loss='labels'` (classification only)."""
    raise ValueError(f"optim.loss='labels' needs a classification task by label words; task "
                     f"{self.name!r} is not one (use optim.loss='lm').")

  def train_examples(self, items: list, tokenizer, dc) -> Examples:
    raise NotImplementedError

  def item_labels(self, items: list) -> np.ndarray:
    """A class per item for label-skew partitions (0 when the task has none)."""
    return np.zeros((len(items),), np.int64)

  def evaluate(self, parts, tokenizer, items: list, dc) -> dict:
    raise NotImplementedError


def field(record: dict, names: tuple[str, ...], where: str, *, kind=str, allow_empty=False):
  """The first of `names` present in the record, checked.

  Raises:
    ValueError: `where: no field 'x'` (listing the record's fields), an empty or mistyped value.
  """
  for name in names:
    if name in record:
      value = record[name]
      break
  else:
    raise ValueError(f"{where}: no field {names[0]!r} (fields: {sorted(record)}).")
  if kind is str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
      raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}.")
  return value


def fit(head: np.ndarray, body: np.ndarray, tail: np.ndarray, room: int,
        keep: str = "start") -> np.ndarray:
  """head + body + tail in at most `room` tokens: the body is cut (keeping its start or end)."""
  space = room - len(head) - len(tail)
  if space < 1:
    raise ValueError(f"data.max_length leaves {space} tokens for the text: raise data.max_length "
                     "or lower data.max_answer_tokens.")
  if len(body) > space:
    body = body[:space] if keep == "start" else body[len(body) - space:]
  return np.concatenate([head, body, tail]).astype(np.int32)


def encode_parts(tokenizer, template: str, body_field: str, values: dict):
  """(head ids, body ids, tail ids) of `template` with {body_field} the truncatable part."""
  head, tail = template.split("{" + body_field + "}", 1)
  return (encode(tokenizer, head.format(**values)), encode(tokenizer, str(values[body_field])),
          encode(tokenizer, tail.format(**values)))
