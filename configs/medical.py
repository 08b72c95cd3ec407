"""Medical: DP federated LoRA of SmolLM2-135M-Instruct on MedQuAD (generative QA).

  python -m launch.train --config configs/medical.py --workdir runs/medquad
  python -m launch.sweep --config configs/medical.py --workdir runs/medical_sweep
  python -m launch.eval --workdir runs/medquad --task liveqa \\
      --file ../shared/data/liveqa_med_trec2017/test.jsonl
  python -m launch.eval --workdir runs/medquad --task mediqa \\
      --file ../shared/data/mediqa2019_qa/test.jsonl

MedQuAD's shipped 1,297-pair sample is split 80/20 with a fixed seed (`all_sample.jsonl::train`
/ `::test`); the loss covers the answer's first `data.max_answer_tokens` tokens; evaluation is
greedy generation scored by ROUGE-1/2/L and the answer-token perplexity. LiveQA and MEDIQA are
not shipped (no stated license): evaluate on them from their paths.

The DP recipe is `configs.common.smollm2_dp_recipe` (found on TFNS) with SGD lr 1 instead of 4
(docs/results.md, 4k: lr 4 destroys the model on this 48-token loss; 0.3 / 1 / 2 measured); the
non-private sweep points use SGD lr 0.2.
"""

from configs.common import apply_args, base_config, smollm2_dp_recipe

ARGS = {"eps": "dp.target_epsilon", "rank": "lora.rank", "rounds": "fed.rounds",
        "batch": "data.batch_size", "lr": "optim.learning_rate", "mode": "dp.mode",
        "agg": "fed.aggregation", "clients": "fed.num_clients"}


def get_config(arg: str | None = None):
  c = base_config()
  smollm2_dp_recipe(c, delta=1e-4)
  c.optim.learning_rate = 1.0  # results 4k: the best DP step of 0.3 / 1 / 2 / 4 on MedQuAD
  c.data.task = "medquad"
  c.data.max_length = 128
  c.data.max_answer_tokens = 48
  c.data.max_new_tokens = 48
  c.data.eval_examples = 100
  c.data.batch_size = 16
  c.fed.num_clients = 4
  c.fed.rounds = 5
  apply_args(c, arg, ARGS)
  c.data.max_client_size = -(-1038 // c.fed.num_clients)  # 1,038 training pairs, split evenly
  c.lock()
  return c


def sweep():
  return {"privacy": [{"dp.mode": "none", "optim.learning_rate": 0.2}, {"dp.target_epsilon": 8.0}],
          "fed.aggregation": ["fedavg", "ffa"]}
