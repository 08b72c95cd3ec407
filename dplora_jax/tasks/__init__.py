"""Tasks of the paper's three domains, by name: `get("tfns")`, `names()`.

| name | domain | kind | train data | held-out data |
|---|---|---|---|---|
| tfns, finance_sentiment | finance | sentiment | packaged TFNS train | packaged TFNS validation |
| fiqa_sa | finance | sentiment | - | a path (not shipped: no stated license) |
| fpb | finance | sentiment | - | the user's copy (`Sentences_50Agree.txt` or a `datasets` dir) |
| boolq, piqa, winogrande | general | choice | `validation.jsonl::train` | `validation.jsonl::test` |
| medquad | medical | qa | `all_sample.jsonl::train` | `all_sample.jsonl::test` |
| liveqa, mediqa | medical | qa | - | a path (not shipped: no stated license) |

`::train` / `::test` are fixed-seed parts of one shipped file (`data.io.SPLIT_SEED`): 30% held out
for the general tasks, 20% for MedQuAD. `finance_sentiment` is any {text, label} file whose labels
are the label words (or ids in `data.labels` order); `tfns` is the same task on TFNS.
"""

from __future__ import annotations

import difflib

from dplora_jax.tasks.base import Task
from dplora_jax.tasks.choice import ChoiceTask
from dplora_jax.tasks.qa import QATask
from dplora_jax.tasks.sentiment import PhraseBankTask, SentimentTask

_TFNS = dict(domain="finance", kind="sentiment", train_source="tfns/train.jsonl",
             eval_source="tfns/validation.jsonl")
_SPLIT = 0.3
TASKS: dict[str, Task] = {t.name: t for t in [
    SentimentTask("tfns", about="Twitter Financial News Sentiment (FinGPT)", **_TFNS),
    SentimentTask("finance_sentiment", about="any {text, label} file with the label words",
                  **_TFNS),
    SentimentTask("fiqa_sa", domain="finance", kind="sentiment",
                  label_order=("positive", "neutral", "negative"),
                  about="FiQA-SA, e.g. ../shared/data/fiqa_sa/test150_fingpt_rag.jsonl"),
    PhraseBankTask("fpb", domain="finance", kind="sentiment", text_fields=("sentence", "text"),
                   label_order=("negative", "neutral", "positive"),
                   about="Financial PhraseBank from your copy: Sentences_50Agree.txt or the "
                         "Hugging Face dataset saved with save_to_disk"),
    ChoiceTask("boolq", domain="general", kind="choice", style="boolq",
               train_source="boolq/validation.jsonl::train",
               eval_source="boolq/validation.jsonl::test", test_fraction=_SPLIT,
               about="BoolQ yes/no questions"),
    ChoiceTask("piqa", domain="general", kind="choice", style="piqa",
               train_source="piqa/validation.jsonl::train",
               eval_source="piqa/validation.jsonl::test", test_fraction=_SPLIT,
               about="PIQA physical commonsense"),
    ChoiceTask("winogrande", domain="general", kind="choice", style="winogrande",
               train_source="winogrande/validation.jsonl::train",
               eval_source="winogrande/validation.jsonl::test", test_fraction=_SPLIT,
               about="WinoGrande (partial scoring)"),
    QATask("medquad", domain="medical", train_source="medquad/all_sample.jsonl::train",
           eval_source="medquad/all_sample.jsonl::test", test_fraction=0.2,
           about="MedQuAD medical QA"),
    QATask("liveqa", domain="medical",
           about="LiveQA medical (TREC 2017), e.g. ../shared/data/liveqa_med_trec2017/test.jsonl"),
    QATask("mediqa", domain="medical",
           about="MEDIQA 2019 QA, e.g. ../shared/data/mediqa2019_qa/test.jsonl"),
]}


def names() -> list[str]:
  return sorted(TASKS)


def get(name: str) -> Task:
  """The task called `name`.

  Raises:
    ValueError: an unknown name, with the closest known ones.
  """
  if name not in TASKS:
    close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown task {name!r}{hint}; known tasks: {', '.join(names())}.")
  return TASKS[name]
