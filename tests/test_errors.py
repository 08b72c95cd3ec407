"""The docs/errors.md cases not covered next to their modules: models vs data, data records."""

import pytest

from configs import tiny
from dplora_jax import build, config as config_lib
from tests import hf_fixtures


def _cfg(**fields):
  c = tiny.get_config()
  with c.unlocked():
    for dotted, v in fields.items():
      section, field = dotted.split("__")
      c[section][field] = v
  return config_lib.from_config_dict(c)


def test_sequence_longer_than_the_model_allows(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama", tokenizer=True)  # max_position_embeddings = 64
  with pytest.raises(ValueError, match="data.max_length=96 exceeds the model's "
                                       "max_position_embeddings=64"):
    build.build(_cfg(model__path=str(tmp_path), model__random_init=False, data__max_length=96))


def test_tokenizer_mismatch(tmp_path):
  hf_fixtures.write_hf(tmp_path, "llama", tokenizer=True)  # 257 tokens, 128 embeddings
  with pytest.raises(ValueError, match="tokenizer mismatch: .* has 257 tokens but the model "
                                       "embeds only 128"):
    build.build(_cfg(model__path=str(tmp_path), model__random_init=False, data__max_length=48))


@pytest.mark.parametrize("line,match", [
    ('{"sentence": "no text field", "label": 1}', "record 1 has no field 'text'"),
    ('{"text": "fine", "label": "bullish"}', "record 1 has label 'bullish'; expected one of"),
    ('{"text": "fine", "label": 7}', r"record 1 has label 7; expected 0..2"),
    ('{"text": broken json', r"bad.jsonl:2: not valid JSON"),
])
def test_bad_data_records_name_the_record(tmp_path, line, match):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine", "label": 1}\n' + line + "\n")
  with pytest.raises(ValueError, match=match):
    build.build(_cfg(data__train_file=str(bad), fed__num_clients=1, data__batch_size=1,
                     dp__delta=0.1, dp__allow_large_delta=True))
