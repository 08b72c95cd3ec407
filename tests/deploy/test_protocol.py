"""The message schema: what may travel between server and client, checked on both sides."""

import jax
import numpy as np
import pytest

from dplora_jax.deploy import protocol
from tests import tiny


def _ok(**over):
  c = dict(client_id=0, round=1, status="ok", reason="", epsilon=1.0, epsilon_budget=8.0)
  return c | over


def test_lora_round_trips_through_named_float32_arrays():
  _, lora, _ = tiny.model_and_lora()
  arrays = protocol.lora_to_arrays(lora)
  assert all(a.dtype == np.float32 for a in arrays.values())
  assert "layers.attn.q.lora_b" in arrays
  back = protocol.arrays_to_lora(arrays, lora)
  for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(protocol.ProtocolError, match="missing"):
    protocol.arrays_to_lora({k: v for k, v in list(arrays.items())[1:]}, lora)
  bad = dict(arrays)
  name = next(iter(bad))
  bad[name] = np.full_like(bad[name], np.nan)
  with pytest.raises(protocol.ProtocolError, match="not finite"):
    protocol.arrays_to_lora(bad, lora)


def test_a_reply_cannot_carry_anything_outside_the_schema():
  arrays = {"x": np.zeros(3, np.float32)}
  protocol.reply(protocol.TRAIN, arrays, **_ok())
  with pytest.raises(protocol.ProtocolError, match="schema"):  # e.g. a leaked statistic
    protocol.reply(protocol.TRAIN, arrays, **_ok(loss=0.3))
  with pytest.raises(protocol.ProtocolError, match="schema"):
    protocol.reply(protocol.TRAIN, arrays, **{k: v for k, v in _ok().items() if k != "epsilon"})
  with pytest.raises(protocol.ProtocolError, match="float32"):
    protocol.reply(protocol.TRAIN, {"x": np.zeros(3, np.float64)}, **_ok())
  with pytest.raises(protocol.ProtocolError, match="no arrays"):  # a refusal sends nothing
    protocol.reply(protocol.TRAIN, arrays, **_ok(status="refused"))
  with pytest.raises(protocol.ProtocolError, match="scalars"):
    protocol.reply(protocol.TRAIN, arrays, **_ok(reason=["a"]))
  with pytest.raises(protocol.ProtocolError, match="unknown message kind"):
    protocol.reply("evaluate", arrays, **_ok())


def test_flower_records_round_trip_the_message():
  from dplora_jax.deploy import flower
  msg = protocol.reply(protocol.TRAIN, {"a.b": np.arange(6, dtype=np.float32).reshape(2, 3)},
                       **_ok())
  back = flower.from_record(flower.to_record(msg))
  assert back["config"] == msg["config"]
  np.testing.assert_array_equal(back["arrays"]["a.b"], msg["arrays"]["a.b"])
  assert back["arrays"]["a.b"].dtype == np.float32


def test_bad_deployment_input_is_one_clear_error(tmp_path):
  from dplora_jax import config_files
  from dplora_jax.deploy import flower
  from launch import deploy_local
  for override, match in ((("dp.mode", "paper"), "not deployable"),
                          (("dp.adaptive_clip_quantile", "0.5"), "adaptive client clipping")):
    cfg = config_files.load_with_overrides(
        "configs/tiny.py:mode=client" if "adaptive" in override[0] else "configs/tiny.py:steps=1",
        dict([override] + ([("data.sampling", "shuffle")] if override[1] == "paper" else [])))
    with pytest.raises(ValueError, match=match):
      protocol.check_deployable(cfg)
  with pytest.raises(ValueError, match="needs 'config'"):
    flower.server_settings({"workdir": str(tmp_path)})
  with pytest.raises(ValueError, match="is not a.b=value"):
    flower.server_settings({"config": "configs/tiny.py", "workdir": str(tmp_path),
                            "overrides": "dp.mode"})
  with pytest.raises(ValueError, match="expected true or false"):
    flower.server_settings({"config": "configs/tiny.py", "workdir": str(tmp_path),
                            "evaluate": "perhaps"})
  cfg, settings = flower.server_settings({"config": "configs/tiny.py:clients=3",
                                          "workdir": str(tmp_path), "overrides": "fed.rounds=2",
                                          "evaluate": False})
  assert (cfg.fed.num_clients, cfg.fed.rounds, settings.evaluate) == (3, 2, False)
  with pytest.raises(ValueError, match="unknown config key dp.epsilon"):
    deploy_local.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                       "--config.dp.epsilon=3"])
  assert not (tmp_path / "w").exists()  # nothing started, nothing written


def test_the_cheap_fingerprint_is_the_loaders(tmp_path):
  """A client's hello compares `build.base_fingerprint` (no weights read) with the server's
  `load_base` fingerprint: they must be the same function of the files."""
  from dplora_jax import build, config_files
  from tests import hf_fixtures
  hf_fixtures.write_hf(tmp_path, "llama", tokenizer=True)
  for spec, over in (("configs/tiny.py", {}),
                     ("configs/tiny.py", {"model.random_init": "false",
                                          "model.path": str(tmp_path), "data.max_length": "32",
                                          "data.max_answer_tokens": "8"})):
    cfg = config_files.load_with_overrides(spec, over)
    assert build.base_fingerprint(cfg) == build.load_base(cfg)[2]
