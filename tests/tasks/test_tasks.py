"""Tasks: each metric against a hand-computed case, scoring against the direct computation,
prompts and partial scoring as lm-evaluation-harness writes them, loaders and splits."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dplora_jax import config as config_lib, lora as lora_lib, tasks
from dplora_jax.data import io
from dplora_jax.models import ModelConfig, build_model, load_tokenizer
from dplora_jax.models.tokenizer import encode
from dplora_jax.tasks import metrics, scoring


@pytest.fixture(scope="module")
def lm():
  """A tiny random Llama over SmolLM2's real tokenizer, with a nonzero LoRA."""
  tok = load_tokenizer("smollm2-135m-instruct")
  arch = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=16, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=24)
  model = build_model(arch, seed=3)
  lora_lib.add_lora(model, lora_lib.LoRAConfig(rank=2), jax.random.key(1))
  g, lora, frozen = lora_lib.split(model)
  lora = jax.tree.map(lambda x: x + 0.3, lora)
  return scoring.ModelParts(g, lora, frozen), tok


def _dc(task, **kw):
  return dataclasses.replace(config_lib.DataConfig(task=task), **kw)


def _by_hand(parts, pairs):
  """[N] log p(cont | ctx) of (ctx, cont) token pairs, from the full logits of every position
  (one right-padded batch: causal attention leaves the real positions unchanged)."""
  seqs = [np.concatenate([c, a]) for c, a in pairs]
  width = max(len(q) for q in seqs)
  tokens = np.zeros((len(seqs), width), np.int32)
  for i, q in enumerate(seqs):
    tokens[i, :len(q)] = q
  mask = np.arange(width)[None] < np.array([len(q) for q in seqs])[:, None]
  logp = np.asarray(jax.nn.log_softmax(
      lora_lib.apply(parts.graphdef, parts.lora, parts.frozen, tokens, mask), -1))
  return np.array([sum(logp[i, len(c) - 1 + j, t] for j, t in enumerate(a))
                   for i, (c, a) in enumerate(pairs)])


def test_f1_variants_on_a_confusion_matrix_worked_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 0, 1, 1, 2, 2])
  # class 0: tp 2, fp 0, fn 1 -> 4/5; class 1: tp 1, fp 1, fn 1 -> 1/2; class 2: tp 1, fp 1 -> 2/3
  m = metrics.classification_metrics(pred, labels, 3)
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
  assert m["f1_micro"] == pytest.approx(4 / 6)  # single-label: micro F1 is the accuracy
  assert m["majority_accuracy"] == pytest.approx(3 / 6)
  assert m["f1_per_label"] == pytest.approx([0.8, 0.5, 2 / 3])
  assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
  # label frequencies 1/2, 1/3, 1/6
  assert m["prior_nll"] == pytest.approx(-(np.log(1 / 2) / 2 + np.log(1 / 3) / 3
                                           + np.log(1 / 6) / 6))
  # a class never true nor predicted has F1 0 (scikit-learn's zero_division=0)
  assert metrics.classification_metrics(np.array([0, 1]), np.array([0, 1]), 3)["f1_macro"] == \
      pytest.approx(2 / 3)


def test_rouge_l_on_known_strings():
  from rouge_score import rouge_scorer
  pred, ref = "the cat sat on the mat", "the cat is on the mat"
  got = metrics.rouge([pred], [ref])
  # LCS "the cat on the mat": 5 of 6 tokens each way
  assert got["rougeL"] == pytest.approx(5 / 6)
  # bigrams: the-cat, on-the, the-mat shared of 5 each
  assert got["rouge2"] == pytest.approx(3 / 5)
  lib = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"]
  assert got["rougeL"] == pytest.approx(lib.fmeasure)


def test_piqa_scored_by_hand(lm):
  parts, tok = lm
  task = tasks.get("piqa")
  recs = io.Records([{"goal": "Open a jar", "choices": ["twist the lid.", "bake it."],
                      "label": 0},
                     {"goal": "Dry wet hair", "choices": ["use a towel", "use a fork, slowly"],
                      "label": 1},
                     {"goal": "Cut paper", "choices": ["scissors", "a spoon"], "label": 0}],
                    "piqa.jsonl")
  dc = _dc("piqa", max_length=64, eval_batch_size=2)  # 6 requests: 3 batches, one padded
  items = task.items(recs, dc)
  assert items[0].contexts == ("Question: Open a jar\nAnswer:",) * 2
  assert items[0].continuations == (" twist the lid.", " bake it.")
  hand = _by_hand(parts, [(encode(tok, x), encode(tok, c)) for it in items
                          for x, c in zip(it.contexts, it.continuations)]).reshape(3, 2)
  got = task.evaluate(parts, tok, items, dc)
  gold = np.array([0, 1, 0])
  chars = np.array([[len(c) - 1 for c in it.continuations] for it in items])
  assert got["acc"] == pytest.approx(np.mean(hand.argmax(1) == gold))
  assert got["acc_norm"] == pytest.approx(np.mean((hand / chars).argmax(1) == gold))
  assert got["nll"] == pytest.approx(-hand[np.arange(3), gold].mean(), abs=1e-4)


def test_winogrande_partial_scoring_on_a_hand_built_item(lm):
  parts, tok = lm
  task = tasks.get("winogrande")
  rec = {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
         "choices": ["trophy", "suitcase"], "label": 0}
  [it] = task.items(io.Records([rec]), _dc("winogrande"))
  assert it.contexts == ("The trophy did not fit in the suitcase because the trophy",
                         "The trophy did not fit in the suitcase because the suitcase")
  assert it.continuations == (" was too big.",) * 2  # the same suffix scored after each option
  dc = _dc("winogrande", max_length=48)
  hand = _by_hand(parts, [(encode(tok, x), encode(tok, c))
                          for x, c in zip(it.contexts, it.continuations)])
  got = task.evaluate(parts, tok, [it], dc)
  assert got["acc"] == float(np.argmax(hand) == 0)
  assert got["nll"] == pytest.approx(-hand[0], abs=1e-4)


def test_boolq_prompt_and_labels():
  task = tasks.get("boolq")
  [it] = task.items(io.Records([{"passage": "P.", "question": "is it", "label": True}]),
                    _dc("boolq"))
  assert it.contexts[0] == "P.\nQuestion: is it?\nAnswer:"
  assert it.continuations == (" no", " yes") and it.gold == 1


def test_one_token_choices_share_one_forward_and_equal_the_direct_computation(lm, monkeypatch):
  """BoolQ's " no" / " yes" follow the same passage: one forward per distinct context (the head
  read at each choice), mixed with multi-token continuations, every score as computed alone."""
  parts, tok = lm
  calls = []
  real = scoring._next_token_logprobs
  monkeypatch.setattr(scoring, "_next_token_logprobs",
                      lambda *a: calls.append(a[3].shape[0]) or real(*a))
  no, yes, maybe = (encode(tok, w) for w in (" no", " yes", " perhaps so"))
  ctxs = [encode(tok, t) for t in ("P. one\nQuestion: is it?\nAnswer:",
                                   "A longer passage about many things\nQuestion: is it?\nAnswer:",
                                   "Short\nAnswer:")]
  reqs = [(ctxs[0], no), (ctxs[1], no), (ctxs[0], yes), (ctxs[1], yes), (ctxs[2], yes),
          (ctxs[0], maybe), (ctxs[2], no)]
  got = scoring.continuation_logprobs(parts, reqs, tok.pad_token_id, 64, batch_size=2)
  np.testing.assert_allclose(got, _by_hand(parts, reqs), atol=1e-5)
  assert calls == [2, 2]  # 3 distinct one-token contexts in batches of 2, not 6 rows
  # a context cut to max_length - 1 tokens is the same cut as the scored row's
  long_ctx = np.concatenate([ctxs[1]] * 4)
  got = scoring.continuation_logprobs(parts, [(long_ctx, no), (long_ctx, yes)],
                                      tok.pad_token_id, 20, batch_size=2)
  np.testing.assert_allclose(got, _by_hand(parts, [(long_ctx[-19:], no), (long_ctx[-19:], yes)]),
                             atol=1e-5)


def test_label_scores_bucketed_equal_the_direct_computation(lm):
  parts, tok = lm
  task = tasks.get("tfns")
  dc = _dc("tfns", max_length=96, eval_batch_size=2)  # 2 batches of 2 widths, one padded
  texts = ["up", "a much longer tweet about the market falling all day long today", "flat"]
  items = task.items(io.Records([{"text": t, "label": i % 3} for i, t in enumerate(texts)]), dc)
  ex = task.train_examples(items, tok, dc)
  answers = [encode(tok, " " + w) for w in dc.labels]
  got = scoring.label_scores(parts, ex, answers, tok.pad_token_id, 3)
  hand = _by_hand(parts, [(ex.tokens[i, :ex.prompt_len[i]], a) for i in range(len(texts))
                          for a in answers]).reshape(len(texts), 3)
  np.testing.assert_allclose(got, hand, atol=1e-4)
  # the eval's two NLLs of the gold label: over the vocabulary, and among the label words only
  m = task.evaluate(parts, tok, items, dc)
  gold = np.arange(len(texts)) % 3
  p = np.exp(hand) / np.exp(hand).sum(1, keepdims=True)
  assert m["nll"] == pytest.approx(-hand[np.arange(3), gold].mean(), abs=1e-4)
  assert m["label_nll"] == pytest.approx(-np.log(p[np.arange(3), gold]).mean(), abs=1e-4)


def test_qa_trains_on_answer_tokens_and_reports_rouge(lm):
  parts, tok = lm
  task = tasks.get("medquad")
  dc = _dc("medquad", max_length=40, max_answer_tokens=6, max_new_tokens=3, eval_batch_size=2)
  items = task.items(io.Records([{"question": "What is flu?", "answer": "A viral infection "
                                  "of the nose, throat and lungs, often seasonal."}] * 3), dc)
  raw = dataclasses.replace(dc, chat_template=False)
  ex = task.train_examples(items, tok, raw)
  assert ex.loss_mask.sum(1).tolist() == [6, 6, 6]  # the answer, cut at max_answer_tokens
  first = ex.targets[0][ex.loss_mask[0]]
  np.testing.assert_array_equal(first, encode(tok, " A viral infection of the nose")[:6])
  assert tok.decode(ex.tokens[0, :ex.prompt_len[0]]) == "Question: What is flu?\nAnswer:"
  # an instruct tokenizer: the question is the user turn, the answer the assistant's reply
  chat = task.train_examples(items, tok, dataclasses.replace(dc, max_length=64))
  prompt = tok.decode(chat.tokens[0, :chat.prompt_len[0]])
  assert prompt.endswith("<|im_start|>user\nWhat is flu?<|im_end|>\n<|im_start|>assistant\n")
  np.testing.assert_array_equal(chat.targets[0][chat.loss_mask[0]],
                                encode(tok, "A viral infection of the nose")[:6])
  got = task.evaluate(parts, tok, items, dataclasses.replace(dc, max_length=64))
  assert set(got) >= {"rouge1", "rouge2", "rougeL", "nll", "perplexity"}
  assert got["perplexity"] == pytest.approx(np.exp(got["nll"]))


def _write_all_formats(tmp_path, rows):
  import datasets
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "a.json").write_text(json.dumps(rows))
  (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n"
                                                           for r in rows))
  ds = datasets.Dataset.from_list(rows)
  ds.to_parquet(str(tmp_path / "a.parquet"))
  datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
  return ["a.jsonl", "a.json", "a.csv", "a.parquet", "hf::train"]


def test_every_file_format_gives_the_same_items(tmp_path):
  rows = [{"text": f"tweet {i}", "label": ["negative", "positive", "neutral"][i % 3]}
          for i in range(5)]
  task, dc = tasks.get("finance_sentiment"), _dc("finance_sentiment")
  want = task.items(io.Records(rows), dc)
  for name in _write_all_formats(tmp_path, rows):
    assert task.items(task.read(str(tmp_path / name), "eval"), dc) == want, name
  with pytest.raises(ValueError, match=r"hf: a DatasetDict with splits \['test', 'train'\]"):
    task.read(str(tmp_path / "hf"), "eval")
  # a single Dataset directory: ::train / ::test are its fixed-seed parts, like a file's
  import datasets
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
  split_task = dataclasses.replace(task, test_fraction=0.4)
  parts = [split_task.read(str(tmp_path / "one") + "::" + p, "eval") for p in ("train", "test")]
  split = io.split_indices(len(rows), 0.4)
  got = [[r["text"] for r in part] for part in parts]
  assert got == [[rows[i]["text"] for i in split[p]] for p in ("train", "test")]


def test_fixed_seed_parts_are_disjoint_and_cover_the_file():
  task = tasks.get("winogrande")
  train = task.read("", "train")
  test = task.read("", "eval")
  full = io.read_records(io.packaged("winogrande/validation.jsonl"))
  assert len(test) == round(0.3 * len(full)) and len(train) + len(test) == len(full)
  assert not set(train.lines) & set(test.lines)
  assert task.read("", "eval").lines == test.lines  # the same rows every time
  assert test.where(0).startswith(full.source + ":")


def test_phrasebank_and_fiqa_label_conventions(tmp_path):
  dc = _dc("fpb")
  f = tmp_path / "Sentences_50Agree.txt"
  f.write_bytes("Profit rose to EUR 5 mn \xe9 .@positive\nSales fell .@negative\n"
                .encode("latin-1"))
  fpb = tasks.get("fpb")
  items = fpb.items(fpb.read(str(f), "eval"), dc)
  assert [lab for _, lab in items] == [dc.labels.index("positive"), dc.labels.index("negative")]
  assert items[0][0].endswith("\xe9 .")  # ISO-8859-1, as the authors ship it
  # the HF dataset's ids: 0 negative, 1 neutral, 2 positive; FiQA's: 0 positive, 2 negative
  recs = io.Records([{"sentence": "x", "label": 1}])
  assert fpb.items(recs, dc)[0][1] == dc.labels.index("neutral")
  fiqa = tasks.get("fiqa_sa")
  got = fiqa.items(io.Records([{"text": "x", "label": 0}, {"text": "y", "label": 2}]), dc)
  assert [lab for _, lab in got] == [dc.labels.index("positive"), dc.labels.index("negative")]


@pytest.mark.parametrize("task,record,match", [
    ("piqa", {"goal": "g", "choices": ["a"], "label": 0}, r"x.jsonl:1: field 'choices' must be"),
    ("piqa", {"goal": "g", "choices": ["a", "b"], "label": 2}, r"x.jsonl:1: label 2; expected "
                                                                r"an index 0..1"),
    ("winogrande", {"sentence": "no blank", "choices": ["a", "b"], "label": 0},
     r"x.jsonl:1: field 'sentence' must hold exactly one blank"),
    ("medquad", {"question": "q?"}, r"x.jsonl:1: no field 'answer'"),
    ("fiqa_sa", {"text": "t", "label": 5}, r"x.jsonl:1: label 5; expected 0..2"),
])
def test_bad_records_name_the_file_line_and_field(task, record, match):
  t = tasks.get(task)
  with pytest.raises(ValueError, match=match):
    t.items(io.Records([record], "x.jsonl", [1]), _dc(task))
