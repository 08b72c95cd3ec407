"""Bad run configs fail before anything loads or compiles, naming the field."""

import pytest

from configs import demo, tiny
from dplora_jax import config as config_lib


def _cfg(**overrides):
  c = tiny.get_config()
  with c.unlocked():
    for dotted, v in overrides.items():
      section, field = dotted.split("__")
      c[section][field] = v
  return c


def test_demo_and_tiny_configs_convert():
  run = config_lib.from_config_dict(demo.get_config())
  assert (run.fed.num_clients, run.lora.rank, run.lora.targets, run.dp.target_epsilon) == (
      5, 8, ("q", "k", "v"), 8.0)
  run = config_lib.from_config_dict(tiny.get_config("eps=2,rank=2,mode=none"))
  assert (run.dp.target_epsilon, run.lora.rank, run.dp.mode) == (2.0, 2, "none")


@pytest.mark.parametrize("overrides,match", [
    (dict(dp__mode="local"), "dp.mode='local'"),
    (dict(dp__target_epsilon=0.0), "dp.target_epsilon=0.0"),
    (dict(dp__target_epsilon=-1.0), "dp.target_epsilon=-1.0"),
    (dict(dp__delta=0.0), "dp.delta=0.0"),
    (dict(dp__delta=1.5), "dp.delta=1.5"),
    (dict(dp__clip_norm=0.0), "dp.clip_norm=0.0"),
    (dict(dp__clip_norm=-1.0), "dp.clip_norm=-1.0"),
    (dict(dp__accountant="prv"), "dp.accountant='prv'"),
    (dict(fed__aggregation="median"), "fed.aggregation='median'"),
    (dict(fed__server_optimizer="fedyogi"), "fed.server_optimizer='fedyogi'"),
    (dict(fed__client_rate=0.0), "fed.client_rate=0.0"),
    (dict(fed__partition="shards"), "fed.partition='shards'"),
    (dict(fed__num_clients=0), "fed.num_clients=0"),
    (dict(lora__rank=0), "lora.rank=0"),
    (dict(optim__optimizer="lamb"), "optim.optimizer='lamb'"),
    (dict(data__sampling="shuffle"), "data.sampling='shuffle' with dp.mode='sample'"),
])
def test_bad_values(overrides, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    config_lib.from_config_dict(_cfg(**overrides))


def test_unknown_key():
  c = tiny.get_config().to_dict()
  c["dp"]["epsilon"] = 3.0
  with pytest.raises(ValueError, match=r"unknown config keys \['dp.epsilon'\]"):
    config_lib.from_config_dict(c)


def test_unknown_short_arg():
  with pytest.raises(ValueError, match="unknown config arg 'epochs'"):
    tiny.get_config("epochs=3")
