"""The memory planner: a round compiled from shapes only (no weights) on a 4096-wide Llama read
from a config.json, and XLA's per-device memory of it: layer rematerialisation cuts the
activation memory per example >= 4x, temporaries grow linearly with the microbatch and not with
the clients of a device (they run one after another), the examples grow the arguments, and a
bfloat16 base keeps float32 LoRA factors."""

import json

import jax
import numpy as np
import pytest

from configs import llama2_7b_fin
from dplora_jax import config as config_lib, memory_plan
from launch import plan as plan_cli

pytestmark = pytest.mark.slow

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
         "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 8,
         "num_hidden_layers": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama_4096")
  (d / "config.json").write_text(json.dumps(LLAMA))  # no weights: the planner never reads any
  return d


def _cfg(model_dir, **fields):
  # float32 on CPU: XLA:CPU computes bfloat16 matmuls in float32 (its temporaries would measure
  # that conversion, not the model)
  c = llama2_7b_fin.get_config(f"path={model_dir},tokenizer=smollm2-135m-instruct,fsdp=1,"
                               "length=256,dtype=float32")
  with c.unlocked():
    c.model.param_dtype = "float32"
    c.data.length_buckets = 1
    c.dp.accountant = "rdp"  # seconds faster to calibrate than PLD; memory does not depend on it
    for k, v in fields.items():
      section, name = k.split("__")
      c[section][name] = v
  return config_lib.from_config_dict(c)


def test_remat_microbatch_and_clients_per_device(model_dir):
  temp = {}
  for remat in (False, True):
    cfg = _cfg(model_dir, model__remat=remat)
    arch, tok = memory_plan.architecture(cfg)
    parts = (arch, tok, *memory_plan.abstract_parts(cfg, arch))
    for mb in ((2, 4, 8) if remat else (2, 4)):
      p = memory_plan.plan_round(cfg, microbatch=mb, num_devices=1, clients_per_device=1,
                                 parts=parts)
      temp[remat, mb] = p.temp_bytes
      if remat and mb == 2:
        args_one = p.argument_bytes
      assert p.frozen_bytes == sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(parts[4]))
  per_example = {r: (temp[r, 4] - temp[r, 2]) / 2 for r in (False, True)}
  assert per_example[False] >= 4 * per_example[True] > 0
  # linear in the microbatch: 4 -> 8 adds twice what 2 -> 4 added
  assert temp[True, 8] - temp[True, 4] == pytest.approx(2 * (temp[True, 4] - temp[True, 2]),
                                                        rel=0.1)
  two = memory_plan.plan_round(cfg, microbatch=2, num_devices=1, clients_per_device=2,
                               parts=parts)
  assert two.temp_bytes == pytest.approx(temp[True, 2], rel=0.02)  # clients under lax.map
  bound, t = cfg.data.max_client_size, cfg.data.max_length
  assert two.argument_bytes - args_one >= bound * t * (4 + 1 + 4 + 1)  # their examples


def test_a_bfloat16_base_keeps_float32_lora(model_dir):
  cfg = llama2_7b_fin.get_config(f"path={model_dir},tokenizer=smollm2-135m-instruct")
  cfg = config_lib.from_config_dict(cfg)
  arch, _ = memory_plan.architecture(cfg)
  _, lora, frozen = memory_plan.abstract_parts(cfg, arch)
  assert {x.dtype for x in jax.tree.leaves(lora)} == {np.dtype("float32")}
  weights = [x for path, x in jax.tree_util.tree_leaves_with_path(frozen)
             if any(getattr(k, "key", None) in ("kernel", "embedding") for k in path)]
  assert weights and {x.dtype for x in weights} == {jax.numpy.bfloat16.dtype}


def test_plan_command_answers_bad_input_with_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    plan_cli.cli.run(lambda: plan_cli.main(["--config", "configs/llama2_7b_fin.py:path="
                                            f"{tmp_path}"]))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
