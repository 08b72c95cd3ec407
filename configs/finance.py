"""Finance: DP federated LoRA of SmolLM2-135M-Instruct on TFNS, 5 clients, sized for a 2-core CPU.

  python -m launch.train --config configs/finance.py --workdir runs/finance
  python -m launch.sweep --config configs/finance.py --workdir runs/finance_sweep
  python -m launch.eval --workdir runs/finance_sweep/points/NAME --task fiqa_sa \\
      --file ../shared/data/fiqa_sa/test150_fingpt_rag.jsonl

The defaults are the best recipe of the search so far (docs/results.md, section 4): FFA (B only)
at rank 2 on q and v, SGD lr 4, C = 1: the fewest trainable parameters give DP-SGD the best
signal-to-noise per step (B / (sigma sqrt(d))). The sweep: non-private vs example-level DP at eps
8 and 2, FedAvg vs FFA, the same compute at every point (rounds x clients x expected batch); the
non-private points use their own learning rate (unclipped gradients diverge at the DP one).
TFNS validation (a fixed 480-row subset) is the held-out set; FiQA-SA is evaluated afterwards
from its path (it is not shipped).
"""

from configs.common import apply_args, base_config, smollm2_dp_recipe, even_client_bound

ARGS = {"eps": "dp.target_epsilon", "rank": "lora.rank", "clients": "fed.num_clients",
        "rounds": "fed.rounds", "batch": "data.batch_size", "lr": "optim.learning_rate",
        "mode": "dp.mode", "agg": "fed.aggregation", "examples": "data.max_train_examples",
        "clip": "dp.clip_norm", "steps": "fed.local_steps"}


def get_config(arg: str | None = None):
  c = base_config()
  smollm2_dp_recipe(c, delta=1e-5)
  c.data.task = "tfns"
  c.data.max_train_examples = 2500  # 500 per client
  c.data.max_length = 64
  c.data.eval_examples = 480
  c.data.batch_size = 32  # expected Poisson batch per client step
  c.fed.num_clients = 5
  c.fed.rounds = 6
  c.fed.local_steps = 1
  c.eval_every = 0
  apply_args(c, arg, ARGS)
  even_client_bound(c)
  c.lock()
  return c


NON_PRIVATE_LR = 0.2


def sweep():
  return {"privacy": [{"dp.mode": "none", "optim.learning_rate": NON_PRIVATE_LR},
                      {"dp.target_epsilon": 8.0},
                      {"dp.target_epsilon": 2.0}],
          "fed.aggregation": ["fedavg", "ffa"]}
