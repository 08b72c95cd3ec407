"""DP federated LoRA of SmolLM2-135M-Instruct on TFNS financial tweets (the `make demo` job).

  python -m launch.train --config configs/demo.py --workdir runs/demo
  python -m launch.train --config configs/demo.py:eps=4,clients=5 --workdir runs/eps4

The recipe of docs/results.md, section 4p, cut to the 10-minute budget of a 2-core CPU: one
trained layer (29, the last; the frozen layers below it run once per client, cached), centred LoRA
(`lora.centre='loss'`: the adapted layers' mean input, released once with DP and composed into
eps) with B's first rows on the label logits (`lora.init='zero_a_labels'`), rank 4 on o and down,
a loss on the label tokens, client SGD with server momentum 0.9 and a cosine decay.

The noise is added once by a trusted aggregator (`dp.noise_at='server'`: it sees each client's
clipped, un-noised gradient sum; eps holds against everyone else). With each client adding its
own (`:noise_at=client`, the deployment's trust: sqrt(5) more noise in the average) the same
compute ends on the majority class (docs/results.md, 4q).
"""

from configs.common import apply_args, base_config

ARGS = {"eps": "dp.target_epsilon", "rank": "lora.rank", "clients": "fed.num_clients",
        "rounds": "fed.rounds", "lr": "optim.learning_rate", "noise_at": "dp.noise_at"}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.path = "smollm2-135m-instruct"
  c.data.task = "tfns"
  c.data.max_train_examples = 2500  # 500 per client
  c.data.max_length = 64
  c.data.eval_examples = 240
  c.data.batch_size = 64  # expected per-client Poisson batch
  c.lora.first_layer = 29
  c.lora.targets = ("o", "down")
  c.lora.rank = 4
  c.lora.init = "zero_a_labels"
  c.lora.centre = "loss"
  c.optim.loss = "labels"
  c.optim.microbatch_size = 32
  c.optim.learning_rate = 0.1
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = 1e-5
  c.dp.noise_at = "server"
  # PLD: the tight accountant; over-full Poisson samples are cut and accounted in its event
  c.dp.accountant = "pld"
  c.fed.num_clients = 5
  c.fed.rounds = 75
  c.fed.local_steps = 1
  c.fed.server_momentum = 0.9
  c.fed.server_lr_decay = "cosine"
  apply_args(c, arg, ARGS)
  # The public bound on a client's size, declared by the consortium: here an even split of the
  # example budget (q = batch_size / max_client_size; sizes themselves are never released).
  c.data.max_client_size = -(-c.data.max_train_examples // c.fed.num_clients)
  c.lock()
  return c
