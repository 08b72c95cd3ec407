"""General: DP federated LoRA of SmolLM2-135M-Instruct on BoolQ, PIQA or WinoGrande.

  python -m launch.train --config configs/general.py:task=piqa --workdir runs/piqa
  python -m launch.sweep --config configs/general.py --workdir runs/general_sweep

Only the validation files ship: `validation.jsonl::train` (70%) feeds the clients and
`validation.jsonl::test` (30%, fixed seed) is held out (`dplora_jax.tasks`). Training uses the
gold choice's continuation; evaluation is lm-evaluation-harness style log-likelihood (acc,
acc_norm). The sweep: zero-shot / non-private / DP eps 8, FedAvg vs FFA, on each task.

The DP recipe is `configs.common.smollm2_dp_recipe` (found on TFNS, untuned here); the
non-private sweep points use SGD lr 0.2.
"""

from configs.common import apply_args, base_config, smollm2_dp_recipe

ARGS = {"task": "data.task", "eps": "dp.target_epsilon", "rank": "lora.rank",
        "rounds": "fed.rounds", "batch": "data.batch_size", "lr": "optim.learning_rate",
        "mode": "dp.mode", "agg": "fed.aggregation", "clients": "fed.num_clients"}
MAX_LENGTH = {"boolq": 192, "piqa": 96, "winogrande": 64}
TRAIN_SIZES = {"boolq": 2289, "piqa": 1287, "winogrande": 887}  # each `::train` part (70%)
CLIENTS = 4


def get_config(arg: str | None = None):
  c = base_config()
  smollm2_dp_recipe(c, delta=1e-4)
  c.data.task = "piqa"
  c.data.max_answer_tokens = 32
  c.data.eval_examples = 0  # the whole held-out part
  c.data.batch_size = 16
  c.fed.num_clients = CLIENTS
  c.fed.rounds = 5
  apply_args(c, arg, ARGS)
  c.data.max_length = MAX_LENGTH.get(c.data.task, 128)
  c.data.max_client_size = _bound(c.data.task, c.fed.num_clients)
  c.lock()
  return c


def _bound(task: str, clients: int) -> int:
  """The public bound on a client's size: an even split of the task's training part."""
  return -(-TRAIN_SIZES.get(task, 2000) // clients)


def sweep():
  # config args, not overrides: get_config derives each task's length and public bound from it
  return {"config_arg": [f"task={t}" for t in ("boolq", "piqa", "winogrande")],
          "privacy": [{"dp.mode": "none", "optim.learning_rate": 0.2}, {"dp.target_epsilon": 8.0}],
          "fed.aggregation": ["fedavg", "ffa"]}
