"""Llama-3-8B (an HF directory you have) on the finance task: the recipe of
configs/llama2_7b_fin.py with the Llama-3 model.

  python -m launch.plan --config configs/llama3_8b_fin.py:path=/models/Meta-Llama-3-8B \\
      --devices 8 --device_memory_gb 80
"""

from configs.common import apply_args, even_client_bound
from configs.llama2_7b_fin import ARGS, finance_config


def get_config(arg: str | None = None):
  c = finance_config("Meta-Llama-3-8B")
  apply_args(c, arg, ARGS)
  even_client_bound(c)
  c.lock()
  return c
