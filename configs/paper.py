"""The paper's Algorithm 1 as written (dp.mode = "paper") on SmolLM2 and TFNS.

  python -m launch.train --config configs/paper.py --workdir runs/paper
  python -m launch.privacy --config configs/paper.py      # the claim beside the honest eps

PAPER.md's reported settings: K = 5 clients, all of them every round, batch 8, sigma = 2, C = 10,
lr = 5e-4, one plain SGD step per round, rho_k = 1/K. Rank 8 instead of 512 (a 135M model), and
fewer rounds than the paper's 50 so that it finishes on a laptop.
"""

from configs.common import apply_args, base_config

ARGS = {"rounds": "fed.rounds", "sigma": "dp.noise_multiplier", "clip": "dp.clip_norm",
        "lr": "optim.learning_rate", "noise": "dp.paper_noise", "agg": "fed.aggregation"}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.path = "smollm2-135m-instruct"
  c.dp.mode = "paper"
  c.dp.noise_multiplier = 2.0  # the paper's sigma
  c.dp.clip_norm = 10.0  # the paper's C
  c.dp.delta = 1e-5  # not stated in the paper
  c.data.sampling = "shuffle"  # exactly B examples per step
  c.data.batch_size = 8
  c.data.max_train_examples = 2500
  c.data.max_length = 72
  c.data.eval_examples = 240
  c.optim.optimizer = "sgd"
  c.optim.learning_rate = 5e-4
  c.fed.num_clients = 5
  c.fed.client_rate = 1.0
  c.fed.local_steps = 1
  c.fed.weighting = "uniform"  # rho_k = 1/K
  c.fed.rounds = 10
  apply_args(c, arg, ARGS)
  c.lock()
  return c
