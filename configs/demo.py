"""DP federated LoRA of SmolLM2-135M-Instruct on TFNS financial tweets (the `make demo` job).

  python -m launch.train --config configs/demo.py --workdir runs/demo
  python -m launch.train --config configs/demo.py:eps=4,clients=5 --workdir runs/eps4

The recipe of configs/finance_centred.py (docs/results.md, sections 4p-4r) cut to the 10-minute
budget of a 2-core CPU: 2,500 rows, 75 rounds, clip C = 2; one trained layer (29, the last; the
frozen layers below it run once per client, cached), centred LoRA (`lora.centre='loss'`: the
adapted layers' mean input, released once with DP and composed into eps) with B's first rows on
the label logits (`lora.init='zero_a_labels'`), rank 4 on o and down, a loss on the label tokens,
client SGD with server momentum 0.9 and a cosine decay.

The noise is added once by a trusted aggregator (`dp.noise_at='server'`: it sees each client's
clipped, un-noised gradient sum; eps holds against everyone else). With each client adding its
own (`:noise_at=client`, the deployment's trust: sqrt(5) more noise in the average) the same
compute ended on the majority class at C = 1 (docs/results.md, 4q).
"""

from configs.common import apply_args, base_config, even_client_bound
from configs.finance_centred import centred_recipe

ARGS = {"eps": "dp.target_epsilon", "rank": "lora.rank", "clients": "fed.num_clients",
        "rounds": "fed.rounds", "lr": "optim.learning_rate", "noise_at": "dp.noise_at",
        "clip": "dp.clip_norm"}


def get_config(arg: str | None = None):
  c = base_config()
  centred_recipe(c)
  c.data.max_train_examples = 2500  # 500 per client
  c.data.eval_examples = 240
  c.dp.clip_norm = 2.0  # the recipe's 4 needs its 9,500 rows: measured at 2 here (results 4r)
  c.fed.rounds = 75
  apply_args(c, arg, ARGS)
  even_client_bound(c)
  c.lock()
  return c
