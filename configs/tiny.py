"""A random-initialised tiny Llama on a slice of TFNS: seconds to run (tests, smoke checks).

  python -m launch.train --config configs/tiny.py --workdir /tmp/tiny
"""

from configs.common import apply_args, base_config, even_client_bound

ARGS = {"eps": "dp.target_epsilon", "rank": "lora.rank", "clients": "fed.num_clients",
        "rounds": "fed.rounds", "mode": "dp.mode", "agg": "fed.aggregation",
        "client_eps": "dp.client_target_epsilon", "dp_seed": "dp.reproducible_seed",
        "weighting": "fed.weighting", "client_rate": "fed.client_rate",
        "examples": "data.max_train_examples", "batch": "data.batch_size",
        "steps": "fed.local_steps", "lr": "optim.learning_rate",
        "server_opt": "fed.server_optimizer", "ckpt_every": "checkpoint_every",
        "max_client": "data.max_client_size", "diagnostics": "private_diagnostics",
        "buckets": "data.length_buckets"}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.random_init = True
  c.model.tokenizer = "smollm2-135m-instruct"
  c.model.hidden_size = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.intermediate_size = 64
  c.lora.rank = 4
  c.data.max_train_examples = 400
  c.data.max_length = 48
  c.data.length_buckets = 1  # a random tiny model: its compile, not padding, is the cost
  c.data.eval_examples = 32
  c.data.batch_size = 8
  c.optim.microbatch_size = 8
  c.optim.learning_rate = 2.0
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = 1e-4
  c.fed.num_clients = 4
  c.fed.rounds = 5
  c.fed.local_steps = 2
  apply_args(c, arg, ARGS)
  if not c.data.max_client_size:  # the public bound: an even split of the public example budget
    even_client_bound(c)
  c.lock()
  return c


def sweep():
  """A 2 x 2 grid of seconds-long points: non-private vs eps 8, FedAvg vs FFA."""
  return {"privacy": [{"dp.mode": "none"}, {"dp.target_epsilon": 8.0}],
          "fed.aggregation": ["fedavg", "ffa"]}
