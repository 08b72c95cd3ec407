"""The full config tree with defaults; experiment files override what they change.

Every field, its default and its comment live in `dplora_jax/config.py` (the dataclasses): this
file only turns them into an ml_collections ConfigDict, so the two cannot disagree.
"""

import ml_collections

from dplora_jax import config as config_lib


def base_config() -> ml_collections.ConfigDict:
  d = config_lib.defaults()
  for section in d.values():
    if isinstance(section, dict):
      for k, v in section.items():
        if isinstance(v, list):
          section[k] = tuple(v)
  return ml_collections.ConfigDict(d)


def even_client_bound(c: ml_collections.ConfigDict) -> None:
  """The public bound on a client's size, declared by the consortium: an even split of the
  example budget (q = batch_size / max_client_size; sizes themselves are never released)."""
  c.data.max_client_size = -(-c.data.max_train_examples // c.fed.num_clients)


def apply_args(c: ml_collections.ConfigDict, arg: str | None, names: dict) -> None:
  """Applies `k=v,k=v` from `--config file.py:k=v,...` using short names -> dotted fields."""
  if not arg:
    return
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if key not in names:
      raise ValueError(f"unknown config arg {key!r}; expected one of {sorted(names)}.")
    *path, field = names[key].split(".")
    node = c
    for part in path:
      node = node[part]
    old = node[field]
    node[field] = type(old)(value) if not isinstance(old, bool) else value in ("1", "true",
                                                                               "True")


def smollm2_dp_recipe(c: ml_collections.ConfigDict, *, delta: float) -> None:
  """The best DP-LoRA recipe of the search so far (docs/results.md, section 4) on SmolLM2-135M:
  FFA (B only) at rank 2 on q and v, SGD lr 4, C = 1, example-level eps 8 with the PLD accountant.
  Found on TFNS; the general and medical configs start from it untuned."""
  c.model.path = "smollm2-135m-instruct"
  c.lora.targets = ("q", "v")
  c.lora.rank = 2
  c.fed.aggregation = "ffa"
  c.optim.microbatch_size = 8
  c.optim.learning_rate = 4.0
  c.dp.clip_norm = 1.0
  c.dp.target_epsilon = 8.0
  c.dp.delta = delta
  c.dp.accountant = "pld"
