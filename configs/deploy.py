"""A deployment across institutions: 3 clients of SmolLM2-135M-Instruct on TFNS (`make deploy-demo`).

  python -m launch.deploy_local --config configs/deploy.py --workdir runs/deploy

The same file drives the one-program simulation (`python -m launch.train --config
configs/deploy.py --workdir runs/deploy_sim`) and the Flower deployment; each institution adds only
its node config (data file, state directory, its own max-epsilon).
"""

from configs.common import apply_args, base_config

ARGS = {"eps": "dp.target_epsilon", "rounds": "fed.rounds", "clients": "fed.num_clients",
        "mode": "dp.mode", "examples": "data.max_train_examples"}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.path = "smollm2-135m-instruct"
  c.lora.targets = ("q", "k", "v")
  c.data.max_train_examples = 600  # 200 per institution: short rounds on a 2-core CPU
  c.data.max_length = 72
  c.data.length_buckets = 1  # every ClientApp process compiles its program once (cached on disk)
  c.data.eval_examples = 60
  c.data.batch_size = 16
  c.optim.microbatch_size = 8
  c.optim.learning_rate = 1.0
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = 1e-5
  c.dp.accountant = "pld"
  c.fed.num_clients = 3
  c.fed.rounds = 3
  c.fed.local_steps = 1
  apply_args(c, arg, ARGS)
  # the consortium's public bound on an institution's number of examples
  c.data.max_client_size = -(-c.data.max_train_examples // c.fed.num_clients)
  c.lock()
  return c
