"""A deployment across institutions: 3 clients of SmolLM2-135M-Instruct on TFNS
(`make deploy-demo`).

  python -m launch.deploy_local --config configs/deploy.py --workdir runs/deploy

The demo's recipe (configs/demo.py) for 3 institutions. The same file drives the one-program
simulation (`python -m launch.train --config configs/deploy.py --workdir runs/deploy_sim`) and the
Flower deployment; each institution adds only its node config (data file, state directory, its own
max-epsilon).
"""

from configs import demo
from configs.common import apply_args, even_client_bound

ARGS = {"eps": "dp.target_epsilon", "rounds": "fed.rounds", "clients": "fed.num_clients",
        "mode": "dp.mode", "examples": "data.max_train_examples"}


def get_config(arg: str | None = None):
  c = demo.get_config()
  with c.unlocked():
    c.data.max_train_examples = 600  # 200 per institution: short rounds on a 2-core CPU
    c.data.length_buckets = 1  # every ClientApp process compiles its program once (cached on disk)
    c.data.eval_examples = 60
    c.fed.num_clients = 3
    c.fed.rounds = 3
    apply_args(c, arg, ARGS)
    # the consortium's public bound on an institution's number of examples
    even_client_bound(c)
  return c
