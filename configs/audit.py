"""A one-run privacy audit of SmolLM2-135M-Instruct (launch.audit inserts the canaries).

  python -m launch.audit --config configs/audit.py:mode=none --workdir runs/audit_none --canaries 100
  python -m launch.audit --config configs/audit.py:mode=sample,eps=1 --workdir runs/audit_eps1 \
      --canaries 100

Small on purpose: few real examples, so the canaries are a large share of each client's data and
every canary is sampled several times; the bound is only as strong as the attack.
"""

from configs.common import apply_args, base_config

ARGS = {"eps": "dp.target_epsilon", "mode": "dp.mode", "rounds": "fed.rounds",
        "steps": "fed.local_steps", "lr": "optim.learning_rate", "dp_seed": "dp.reproducible_seed"}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.path = "smollm2-135m-instruct"
  c.lora.targets = ("q", "k", "v", "o")
  c.data.max_train_examples = 10  # 5 real tweets per client, plus the included canaries
  c.data.max_length = 48
  c.data.eval_examples = 16
  c.data.batch_size = 8
  c.optim.microbatch_size = 8
  c.optim.optimizer = "adamw"  # memorises the canaries within a few rounds without DP
  c.optim.learning_rate = 0.003
  c.dp.target_epsilon = 1.0
  c.dp.delta = 1e-5
  c.fed.num_clients = 2
  c.fed.rounds = 6
  c.fed.local_steps = 4
  # Public bound: 5 real examples plus the included canaries dealt to each client (about m/4
  # each; 48 holds m = 100 with room). launch.audit refuses a run whose clients exceed it.
  c.data.max_client_size = 48
  apply_args(c, arg, ARGS)
  c.lock()
  return c
