"""Llama-2-7B (an HF directory you have: config.json, safetensors, tokenizer) on the finance task:
example-level DP federated LoRA on TFNS, sized for accelerator hosts, frozen weights split over
fsdp groups, bfloat16 base with float32 LoRA, layer rematerialisation, fused attention.

  python -m launch.plan --config configs/llama2_7b_fin.py:path=/models/Llama-2-7b-hf \\
      --devices 8 --device_memory_gb 80
  python -m launch.train --config configs/llama2_7b_fin.py:path=/models/Llama-2-7b-hf,fsdp=8 \\
      --workdir /shared/runs/llama2_fin          # one host; add --cluster auto for a pod / SLURM

The planner reads only config.json and the tokenizer: it tells what one device needs before any
weight is loaded.
"""

from configs.common import apply_args, base_config, even_client_bound

ARGS = {"path": "model.path", "fsdp": "mesh.fsdp", "eps": "dp.target_epsilon",
        "rank": "lora.rank", "clients": "fed.num_clients", "rounds": "fed.rounds",
        "batch": "data.batch_size", "microbatch": "optim.microbatch_size",
        "length": "data.max_length", "remat": "model.remat", "dtype": "model.dtype",
        "tokenizer": "model.tokenizer"}

DEFAULT_PATH = "Llama-2-7b-hf"


def finance_config(path: str):
  """The shared recipe of the 7B/8B finance configs."""
  c = base_config()
  c.model.path = path
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.model.attention = "dot_product"
  c.lora.targets = ("q", "v")
  c.lora.rank = 8
  c.fed.aggregation = "ffa"
  c.data.task = "tfns"
  c.data.max_train_examples = 10000  # 2,000 per client
  c.data.max_length = 128
  c.data.eval_examples = 480
  c.data.batch_size = 64
  c.optim.microbatch_size = 8
  c.optim.learning_rate = 1.0
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = 1e-5
  c.dp.accountant = "pld"
  c.fed.num_clients = 5
  c.fed.rounds = 20
  c.fed.local_steps = 1
  c.mesh.fsdp = 8
  return c


def get_config(arg: str | None = None):
  c = finance_config(DEFAULT_PATH)
  apply_args(c, arg, ARGS)
  even_client_bound(c)
  c.lock()
  return c
