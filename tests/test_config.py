"""Bad run configs fail before anything loads or compiles, naming the field."""

import os
import pytest

from configs import audit, demo, finance_centred, paper, tiny
from dplora_jax import config as config_lib, config_files


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
      5, 4, ("o", "down"), 8.0)
  assert (run.lora.centre, run.lora.first_layer, run.dp.noise_at, run.dp.clip_norm) == (
      "loss", 29, "server", 2.0)
  run = config_lib.from_config_dict(demo.get_config("noise_at=client,eps=4"))
  assert (run.dp.noise_at, run.dp.target_epsilon) == ("client", 4.0)
  run = config_lib.from_config_dict(tiny.get_config("eps=2,rank=2,mode=none"))
  assert (run.dp.target_epsilon, run.lora.rank, run.dp.mode) == (2.0, 2, "none")
  run = config_lib.from_config_dict(paper.get_config("rounds=3"))
  assert (run.dp.mode, run.dp.noise_multiplier, run.dp.clip_norm, run.fed.rounds) == (
      "paper", 2.0, 10.0, 3)
  run = config_lib.from_config_dict(audit.get_config("mode=none"))
  assert (run.dp.mode, run.optim.optimizer) == ("none", "adamw")


def test_the_centred_finance_recipe_and_the_demo_share_it():
  run = config_lib.from_config_dict(finance_centred.get_config())
  assert (run.data.max_train_examples, run.data.max_client_size, run.fed.rounds,
          run.dp.clip_norm, run.dp.noise_at) == (9500, 1900, 200, 4.0, "server")
  demo_run = config_lib.from_config_dict(demo.get_config())
  for section in ("lora", "optim", "model"):  # the demo is the same recipe, cut to 10 minutes
    assert getattr(demo_run, section) == getattr(run, section)
  assert demo_run.data.max_client_size == 500
  run = config_lib.from_config_dict(finance_centred.get_config("eps=2,noise_at=client,clip=1"))
  assert (run.dp.target_epsilon, run.dp.noise_at, run.dp.clip_norm) == (2.0, "client", 1.0)


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
    (dict(fed__server_momentum=1.0), "fed.server_momentum=1.0"),
    (dict(fed__server_lr_decay="step"), "fed.server_lr_decay='step'"),
    (dict(fed__server_momentum=0.9, fed__server_optimizer="fedadam"), "fed.server_momentum=0.9"),
    (dict(fed__server_adam_eps=0.0, fed__server_optimizer="fedadam"), "fed.server_adam_eps=0.0"),
    (dict(fed__server_adam_eps=1e-5), "fed.server_adam_eps=1e-05"),  # fedavg has no epsilon
    (dict(fed__client_rate=0.0), "fed.client_rate=0.0"),
    (dict(fed__partition="shards"), "fed.partition='shards'"),
    (dict(fed__num_clients=0), "fed.num_clients=0"),
    (dict(lora__rank=0), "lora.rank=0"),
    (dict(optim__optimizer="lamb"), "optim.optimizer='lamb'"),
    (dict(data__sampling="shuffle"), "data.sampling='shuffle' with dp.mode='sample'"),
    # client-level DP
    (dict(dp__mode="client", fed__weighting="uniform", dp__client_clip_norm=0.0),
     "dp.client_clip_norm=0.0"),
    (dict(dp__mode="client", fed__weighting="uniform", dp__client_clip_norm=-2.0),
     "dp.client_clip_norm=-2.0"),
    (dict(dp__mode="client", fed__weighting="examples"),
     "fed.weighting='examples' with dp.mode='client'"),
    (dict(fed__weighting="examples"), "fed.weighting='examples' with dp.mode='sample': weighting"),
    (dict(data__max_client_size=0), "data.max_client_size=0 with dp.mode='sample'"),
    (dict(data__max_client_size=-3), "data.max_client_size=-3"),
    (dict(dp__mode="client", fed__weighting="uniform", dp__client_delta=0.5),
     "dp.client_delta=0.5 >= 1/4"),
    (dict(dp__mode="client", fed__weighting="uniform", dp__adaptive_clip_quantile=1.0),
     "dp.adaptive_clip_quantile=1.0"),
    (dict(fed__client_rate=1.5), "fed.client_rate=1.5"),
    (dict(fed__client_rate=-0.1), "fed.client_rate=-0.1"),
    # paper mode
    (dict(dp__mode="paper", data__sampling="shuffle", fed__local_steps=1, fed__client_rate=0.5),
     "fed.client_rate=0.5 with dp.mode='paper'"),
    (dict(dp__mode="paper", data__sampling="shuffle", fed__local_steps=3),
     "fed.local_steps=3 with dp.mode='paper'"),
    (dict(dp__mode="paper", fed__local_steps=1), "data.sampling='poisson' with dp.mode='paper'"),
    (dict(dp__mode="paper", data__sampling="shuffle", fed__local_steps=1,
          optim__optimizer="adamw"), "optim.optimizer='adamw' with dp.mode='paper'"),
    (dict(dp__paper_noise="sigma"), "dp.paper_noise='sigma'"),
    # FFA
    (dict(fed__aggregation="ffa", lora__init="zero_a"), "fed.aggregation='ffa' with lora.init"),
    (dict(lora__init="orthogonal"), "lora.init='orthogonal'"),
    (dict(lora__centre="middle"), "lora.centre='middle'"),
    (dict(lora__centre_clip=0.0), "lora.centre_clip=0.0"),
    (dict(dp__centre_noise_multiplier=0.0), "dp.centre_noise_multiplier=0.0"),
    (dict(lora__centre="tokens", dp__mode="client", fed__weighting="uniform"),
     "lora.centre='tokens' with dp.mode='client'"),
    (dict(lora__centre="loss", lora__init_from="/some/adapter"),
     "lora.centre='loss' with lora.init_from"),
    (dict(dp__reproducible_seed=-5), "dp.reproducible_seed=-5"),
    # LoRA and data fields
    (dict(lora__alpha=0.0), "lora.alpha=0.0"),
    (dict(data__max_length=4), "data.max_length=4"),
    (dict(data__batch_size=0), "data.batch_size=0"),
    (dict(data__eval_examples=-1), "data.eval_examples=-1"),
    (dict(data__labels=("only",)), "data.labels=('only',)"),
    (dict(data__prompt="no placeholder"), "data.prompt='no placeholder'"),
    (dict(fed__rounds=0), "fed.rounds=0"),
    (dict(fed__local_steps=0), "fed.local_steps=0"),
    (dict(fed__dirichlet_alpha=0.0), "fed.dirichlet_alpha=0.0"),
    (dict(fed__server_lr=0.0), "fed.server_lr=0.0"),
    (dict(optim__learning_rate=-1.0), "optim.learning_rate=-1.0"),
    (dict(optim__microbatch_size=0), "optim.microbatch_size=0"),
    (dict(dp__truncation_delta_fraction=1.0), "dp.truncation_delta_fraction=1.0"),
])
def test_bad_values(overrides, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    config_lib.from_config_dict(_cfg(**overrides))


def test_unknown_key():
  c = tiny.get_config().to_dict()
  c["dp"]["epsilon"] = 3.0
  with pytest.raises(ValueError, match=r"unknown config key dp.epsilon \(closest: "
                                       r"dp.target_epsilon"):
    config_lib.from_config_dict(c)


def test_renamed_key_names_its_new_name():
  c = tiny.get_config().to_dict()
  c["dp"]["noise_seed"] = 3
  with pytest.raises(ValueError, match="dp.noise_seed was renamed dp.reproducible_seed"):
    config_lib.from_config_dict(c)


def test_configs_common_is_the_dataclass_defaults():
  """One source of truth: configs/common.py holds exactly the dataclasses' fields and defaults."""
  from configs import common
  base = common.base_config().to_dict()
  want = config_lib.defaults()

  def norm(d):
    return {k: norm(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
            for k, v in d.items()}

  assert norm(base) == norm(want)
  assert base["data"]["max_length"] == config_lib.DataConfig().max_length
  assert base["data"]["train_file"] == config_lib.DataConfig().train_file


def test_unknown_short_arg():
  with pytest.raises(ValueError, match="unknown config arg 'epochs'"):
    tiny.get_config("epochs=3")


@pytest.mark.parametrize("field,value", [("checkpoint_every", -1), ("checkpoint_keep", 0),
                                         ("log_every", 0)])
def test_bad_top_level_values(field, value):
  c = tiny.get_config()
  with c.unlocked():
    c[field] = value
  with pytest.raises(ValueError, match=f"{field}={value}"):
    config_lib.from_config_dict(c)


@pytest.mark.parametrize("name", sorted(
    f for f in os.listdir(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "common.py")))
def test_every_config_file_and_its_sweep_is_valid(name):
  from dplora_jax import sweep
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name)
  config_files.load_with_overrides(path)
  module_text = open(path).read()
  if "def sweep(" in module_text:
    points = sweep.load_points(path)  # each point's overrides give a valid config
    assert len({p.name for p in points}) == len(points) >= 2


def test_overrides_are_typed_by_the_field_and_name_bad_keys():
  cfg = config_files.load_with_overrides("configs/tiny.py:rounds=2", {
      "lora.targets": "q,v", "private_diagnostics": "true", "dp.target_epsilon": "4",
      "fed.num_clients": "3", "data.task": "piqa"})
  assert cfg.lora.targets == ("q", "v") and cfg.private_diagnostics is True
  assert cfg.dp.target_epsilon == 4.0 and cfg.fed.num_clients == 3 and cfg.fed.rounds == 2
  assert cfg.data.task == "piqa"
  for key, value, match in [("fed.num_clients", "2.5", "expected an integer"),
                            ("private_diagnostics", "maybe", "expected true or false"),
                            ("fed.num_client", "3", r"unknown config key fed.num_client "
                                                    r"\(closest: fed.num_clients")]:
    with pytest.raises(ValueError, match=match):
      config_files.load_with_overrides("configs/tiny.py", {key: value})
