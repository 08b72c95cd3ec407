"""Medical: generative question answering (MedQuAD, LiveQA TREC 2017, MEDIQA 2019).

Prompt `Question: {question}\\nAnswer:`, answer ` {answer}` cut to `data.max_answer_tokens`
(training loss on the answer tokens only). Evaluation: greedy generation with the KV-cache
generator (`data.max_new_tokens`, cut at the end-of-sequence token or a new "Question:"),
ROUGE-1/2/L F-measures against the full reference answer (`rouge-score`, stemmed), and the
answer-token log-likelihood of the (cut) reference: `nll` (mean per token) and `perplexity`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dplora_jax import lora as lora_lib
from dplora_jax.data import classification as data_lib
from dplora_jax.generate import generate
from dplora_jax.models.tokenizer import encode
from dplora_jax.tasks import base, metrics, scoring

PROMPT = "Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class QATask(base.Task):
  kind: str = "qa"
  metric: str = "rougeL"

  def items(self, records, dc):
    out = []
    for i, r in enumerate(records):
      where = records.where(i)
      out.append((base.field(r, ("question",), where), base.field(r, ("answer",), where)))
    return out

  def _template(self, tokenizer, dc) -> str:
    """PROMPT, or the question as a user turn of the tokenizer's chat template (an instruct
    model answers a bare "Answer:" with its end-of-turn token)."""
    if not (dc.chat_template and getattr(tokenizer, "chat_template", None)):
      return PROMPT
    mark = "\x00question\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    head, tail = text.split(mark)
    return head.replace("{", "{{").replace("}", "}}") + "{question}" + \
        tail.replace("{", "{{").replace("}", "}}")

  def _prompt(self, tokenizer, question: str, room: int, dc) -> np.ndarray:
    head, body, tail = base.encode_parts(tokenizer, self._template(tokenizer, dc), "question",
                                         {"question": question})
    return base.fit(head, body, tail, room, keep="end")  # a long question keeps its end

  def _pair(self, tokenizer, question, answer, dc):
    space = "" if self._template(tokenizer, dc) != PROMPT else " "
    a = encode(tokenizer, space + answer.strip())[:dc.max_answer_tokens]
    return self._prompt(tokenizer, question, dc.max_length - len(a), dc), a

  def train_examples(self, items, tokenizer, dc):
    pairs = [self._pair(tokenizer, q, a, dc) for q, a in items]
    return data_lib.pack([p for p, _ in pairs], [a for _, a in pairs], [0] * len(pairs),
                         dc.max_length, tokenizer.pad_token_id)

  def generate_answers(self, parts, tokenizer, items, dc) -> list[str]:
    """Greedy answers, batched at a fixed batch size and bucketed prompt widths."""
    model = lora_lib.merge(parts.graphdef, parts.lora, parts.frozen)
    room = dc.max_length
    prompts = [self._prompt(tokenizer, q, room, dc) for q, _ in items]
    lengths = np.asarray([len(p) for p in prompts])
    out = [""] * len(items)
    bs = dc.eval_batch_size
    for idx in scoring._batches(lengths, bs):
      width = scoring.width_bucket(int(lengths[idx].max()), room)
      full = scoring._pad_rows(idx, bs)
      ids = generate(model, [prompts[i] for i in full], max_new_tokens=dc.max_new_tokens,
                     eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, width=width)
      for j, i in enumerate(idx):
        text = tokenizer.decode(ids[j], skip_special_tokens=True)
        out[i] = text.split("\nQuestion:")[0].strip()
    return out

  def evaluate(self, parts, tokenizer, items, dc):
    reqs = [self._pair(tokenizer, q, a, dc) for q, a in items]
    lp = scoring.continuation_logprobs(parts, reqs, tokenizer.pad_token_id, dc.max_length,
                                       dc.eval_batch_size)
    ntok = np.asarray([len(a) for _, a in reqs])
    loss = float(-lp.sum() / max(ntok.sum(), 1))
    out = {"nll": loss, "perplexity": float(np.exp(loss)), "n": len(items)}
    if dc.max_new_tokens:
      preds = self.generate_answers(parts, tokenizer, items, dc)
      out |= metrics.rouge(preds, [a for _, a in items])
    return out
