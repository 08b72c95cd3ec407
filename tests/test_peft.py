"""PEFT interop: our adapter in peft, peft's adapter in ours, merged export in transformers."""

import json
import os
import shutil

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import rdp
from safetensors.numpy import load_file, save_file

from configs import tiny as tiny_config
from dplora_jax import build, config as config_lib, export, lora as lora_lib, peft, train
from dplora_jax.dp import accounting
from dplora_jax.models import load_model
from tests import hf_fixtures

torch = pytest.importorskip("torch")
peft_lib = pytest.importorskip("peft")

TARGETS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"),
           "gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")}
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 13)).astype(np.int32)


def _with_random_lora(path, family, rank=4, alpha=8.0, rslora=False):
  loaded = load_model(str(path), with_tokenizer=False)
  cfg = lora_lib.LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS[family], use_rslora=rslora)
  lora_lib.add_lora(loaded.model, cfg, jax.random.key(1))
  for dense in lora_lib.adapted_denses(loaded.model).values():  # B = 0 would test nothing
    dense.lora_b = lora_lib.layers.LoRAParam(
        0.05 * jax.random.normal(jax.random.key(2), dense.lora_b[...].shape))
  return loaded, cfg


@pytest.mark.parametrize("family,rslora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_exported_adapter_loads_in_peft_with_the_same_logits(tmp_path, family, rslora):
  base = hf_fixtures.write_hf(tmp_path / "base", family)
  loaded, cfg = _with_random_lora(tmp_path / "base", family, rslora=rslora)
  out = peft.export_adapter(loaded.model, cfg, str(tmp_path / "adapter"),
                            base_model=str(tmp_path / "base"))
  meta = json.load(open(os.path.join(out, "adapter_config.json")))
  assert (meta["peft_type"], meta["r"], meta["fan_in_fan_out"]) == ("LORA", 4, family == "gpt2")
  model = peft_lib.PeftModel.from_pretrained(base, out)
  model.eval()
  want = hf_fixtures.torch_logits(model, TOKENS)
  got = np.asarray(loaded.model(TOKENS))
  np.testing.assert_allclose(got, want, atol=1e-4)
  # the adapter changes the logits (the comparison is not base vs base)
  plain = load_model(str(tmp_path / "base"), with_tokenizer=False).model(TOKENS)
  assert np.abs(np.asarray(plain) - want).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_centred_adapter_is_peft_lora_bias_and_loads_back_centred(tmp_path, family):
  """A centred LoRA (lora.centre): PEFT computes the same logits with lora_B's bias
  -(c A) B; our loader restores the centre itself."""
  base = hf_fixtures.write_hf(tmp_path / "base", family)
  loaded, cfg = _with_random_centred_lora(tmp_path / "base", family, TARGETS[family])
  out = peft.export_adapter(loaded.model, cfg, str(tmp_path / "adapter"),
                            base_model=str(tmp_path / "base"))
  assert json.load(open(os.path.join(out, "adapter_config.json")))["lora_bias"] is True
  model = peft_lib.PeftModel.from_pretrained(base, out)
  model.eval()
  want = hf_fixtures.torch_logits(model, TOKENS)
  got = np.asarray(loaded.model(TOKENS))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert any(k.endswith("lora_B.bias")
             for k in peft.adapter_tensors(loaded.model, list(TARGETS[family])))
  back = load_model(str(tmp_path / "base"), with_tokenizer=False)
  got_cfg = peft.load_adapter(back.model, out)
  assert got_cfg.centre != "none"
  np.testing.assert_allclose(np.asarray(back.model(TOKENS)), got, atol=1e-5)
  # a lora_bias adapter without its centre, or with another centre, is refused by name
  os.rename(os.path.join(out, peft.CENTRE_WEIGHTS), str(tmp_path / "c.safetensors"))
  with pytest.raises(ValueError, match="lora_bias=true without"):
    peft.load_adapter(load_model(str(tmp_path / "base"), with_tokenizer=False).model, out)
  other = {k: v + 1.0 for k, v in load_file(str(tmp_path / "c.safetensors")).items()}
  save_file(other, os.path.join(out, peft.CENTRE_WEIGHTS))
  with pytest.raises(ValueError, match="is not -\\(c A\\) B"):
    peft.load_adapter(load_model(str(tmp_path / "base"), with_tokenizer=False).model, out)


def _with_random_centred_lora(path, family, targets):
  loaded = load_model(str(path), with_tokenizer=False)
  cfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=targets, centre="tokens")
  lora_lib.add_lora(loaded.model, cfg, jax.random.key(1))
  for dense in lora_lib.adapted_denses(loaded.model).values():
    dense.lora_b = lora_lib.layers.LoRAParam(
        0.05 * jax.random.normal(jax.random.key(2), dense.lora_b[...].shape))
  lora_lib.set_centre(loaded.model, {
      t: jax.random.normal(jax.random.key(3 + i), c.shape)
      for i, (t, c) in enumerate(lora_lib.centres(loaded.model).items())})
  return loaded, cfg


@pytest.mark.parametrize("family,targets,source", [
    ("llama", ("o", "down"), False),  # the demo's: config written here, zero q/k/v/gate/up biases
    ("llama", TARGETS["llama"], True),
    ("gpt2", TARGETS["gpt2"], True)])
def test_a_centred_lora_merges_into_biases_that_transformers_loads(tmp_path, family, targets,
                                                                   source):
  """Merged, a centred LoRA's shift -s (c A) B is the layer's bias: transformers (Llama's
  attention_bias / mlp_bias) and our loader give the centred model's logits."""
  from transformers import AutoModelForCausalLM
  hf_fixtures.write_hf(tmp_path / "base", family)
  loaded, _ = _with_random_centred_lora(tmp_path / "base", family, targets)
  want = np.asarray(loaded.model(TOKENS))
  peft.export_merged(loaded.model, loaded.config, None, str(tmp_path / "merged"),
                     source_path=str(tmp_path / "base") if source else "")
  model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
  np.testing.assert_allclose(hf_fixtures.torch_logits(model.eval(), TOKENS), want, atol=1e-4)
  back = load_model(str(tmp_path / "merged"), with_tokenizer=False)
  np.testing.assert_allclose(np.asarray(back.model(TOKENS)), want, atol=1e-4)
  plain = np.asarray(load_model(str(tmp_path / "base"), with_tokenizer=False).model(TOKENS))
  assert np.abs(plain - want).max() > 1e-3  # the centred LoRA moved the logits


def test_a_centred_lora_on_a_layer_transformers_cannot_bias_is_refused_merged(tmp_path):
  hf_fixtures.write_hf(tmp_path / "base", "qwen2")
  loaded, _ = _with_random_centred_lora(tmp_path / "base", "llama", ("v", "o"))
  with pytest.raises(ValueError, match=r"centred LoRA on \['o'\].*'qwen2'"):
    peft.export_merged(loaded.model, loaded.config, None, str(tmp_path / "merged"),
                       source_path=str(tmp_path / "base"))


def test_merged_export_loads_in_transformers_with_the_same_logits(tmp_path):
  hf_fixtures.write_hf(tmp_path / "base", "llama", tokenizer=True)
  loaded, _ = _with_random_lora(tmp_path / "base", "llama")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  peft.export_merged(loaded.model, loaded.config, None, str(tmp_path / "merged"),
                     source_path=str(tmp_path / "base"))
  assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")
  model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
  AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
  np.testing.assert_allclose(np.asarray(loaded.model(TOKENS)),
                             hf_fixtures.torch_logits(model.eval(), TOKENS), atol=1e-4)


def test_adapter_saved_by_peft_loads_into_dplora_jax(tmp_path):
  base = hf_fixtures.write_hf(tmp_path / "base", "llama")
  cfg = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
  model = peft_lib.get_peft_model(base, cfg)
  model.eval()
  want = hf_fixtures.torch_logits(model, TOKENS)
  model.save_pretrained(str(tmp_path / "theirs"))
  ours = load_model(str(tmp_path / "base"), with_tokenizer=False)
  got_cfg = peft.load_adapter(ours.model, str(tmp_path / "theirs"))
  assert got_cfg.targets == ("q", "v", "down") and got_cfg.rank == 4
  np.testing.assert_allclose(np.asarray(ours.model(TOKENS)), want, atol=1e-4)


def test_workdir_export_and_init_from_round_trip(tmp_path):
  wd = str(tmp_path / "run")
  cfg = config_lib.from_config_dict(tiny_config.get_config("rounds=2,dp_seed=0"))
  result = train.run(cfg, wd, progress=False)
  out = export.export_workdir(wd, str(tmp_path / "adapter"))
  readme = open(os.path.join(out, "README.md")).read()
  assert f"eps = {result.summary['epsilon']:.4f}" in readme
  assert "one example of one client" in readme
  # the export holds the final LoRA and its ledger only: nothing of what strips the noise
  assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json",
                                     "adapter_model.safetensors", "dplora_privacy.json"]
  assert peft.read_ledger(out) == json.load(open(os.path.join(out, peft.LEDGER_FILE)))
  assert "root" not in json.dumps(peft.read_ledger(out))
  # the exported adapter, loaded on the same base, reproduces the trained model
  model = build.load_base(cfg)[0]
  peft.load_adapter(model, out)
  s = result.setup
  trained = lora_lib.apply(s.graphdef, result.lora, s.frozen, TOKENS)
  np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(trained), atol=1e-5)
  # start a new run from it
  c = tiny_config.get_config("rounds=1,dp_seed=1")
  with c.unlocked():
    c.lora.init_from = out
  setup = build.build(config_lib.from_config_dict(c))
  for a, b in zip(jax.tree.leaves(setup.lora), jax.tree.leaves(result.lora)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
  _check_ledger_composition(c, out, result.summary, tmp_path)
  with c.unlocked():
    c.lora.rank = 2
  with pytest.raises(ValueError, match="the adapter has rank=4 but the config says lora.rank=2"):
    build.build(config_lib.from_config_dict(c))


def _check_ledger_composition(c, adapter, first, tmp_path):
  """lora.init_from composes the adapter's ledger; a ledger-less adapter is refused unless it is
  declared public. The expected eps is built here from the two runs' parameters with
  dp-accounting directly."""
  with c.unlocked():
    c.dp.noise_multiplier = 1.0
  cfg = config_lib.from_config_dict(c)
  mech = build.privacy_plan(cfg).get("example")
  q = cfg.data.batch_size / cfg.data.max_client_size
  prior = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      first["sampling_rate"], dp_accounting.GaussianDpEvent(first["noise_multiplier"])),
      first["rounds"] * first["local_steps"])
  new = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(1.0)), cfg.fed.rounds * cfg.fed.local_steps)
  acc_delta = (cfg.dp.delta - first["truncation_delta"]) * (1 - cfg.dp.truncation_delta_fraction)
  want = rdp.RdpAccountant(accounting.RDP_ORDERS).compose(
      dp_accounting.ComposedDpEvent([prior, new])).get_epsilon(acc_delta)
  fresh = rdp.RdpAccountant(accounting.RDP_ORDERS).compose(new).get_epsilon(acc_delta)
  assert mech.epsilon == pytest.approx(want, rel=1e-9) and mech.epsilon > fresh
  assert mech.delta <= cfg.dp.delta and len(mech.prior) == 1
  # declared public: nothing composed, and the report says so
  with c.unlocked():
    c.lora.init_from_public = True
  plan = build.privacy_plan(config_lib.from_config_dict(c))
  assert plan.get("example").prior == () and "declared public" in plan.public["init_from"]
  # the same weights without the ledger metadata: refused unless declared public
  bare = tmp_path / "bare"
  shutil.copytree(adapter, bare)
  w = os.path.join(bare, peft.ADAPTER_WEIGHTS)
  save_file(load_file(w), w, metadata={"format": "pt"})
  with c.unlocked():
    c.lora.init_from = str(bare)
    c.lora.init_from_public = False
  with pytest.raises(ValueError, match="carries no dplora_jax privacy ledger"):
    build.privacy_plan(config_lib.from_config_dict(c))
  with c.unlocked():
    c.lora.init_from_public = True


def test_bad_adapter_directories(tmp_path):
  hf_fixtures.write_hf(tmp_path / "base", "llama")
  m = load_model(str(tmp_path / "base"), with_tokenizer=False).model
  with pytest.raises(FileNotFoundError, match="is not a PEFT adapter directory"):
    peft.load_adapter(m, str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "dora")
  json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
             "use_dora": True}, open(tmp_path / "dora" / "adapter_config.json", "w"))
  with pytest.raises(ValueError, match="use_dora=True is not supported"):
    peft.load_adapter(m, str(tmp_path / "dora"))
