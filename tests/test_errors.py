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
    ('{"sentence": "no text field", "label": 1}', "bad.jsonl:2: no field 'text'"),
    ('{"text": "fine", "label": "bullish"}', "bad.jsonl:2: label 'bullish'; expected one of"),
    ('{"text": "fine", "label": 7}', r"bad.jsonl:2: label 7; expected 0..2"),
    ('{"text": "", "label": 1}', r"bad.jsonl:2: field 'text' must be a non-empty string"),
    ('{"text": broken json', r"bad.jsonl:2: not valid JSON"),
    (b'{"text": "caf\xe9", "label": 1}', r"bad.jsonl: line 2, byte \d+ is not UTF-8"),
    ("", r"bad.jsonl:1: no field 'text'"),
])
def test_bad_data_records_name_the_file_and_line(tmp_path, line, match):
  bad = tmp_path / "bad.jsonl"
  first = '{"text": "fine", "label": 1}\n' if line else '{"sentence": "a", "label": 1}\n'
  bad.write_bytes(first.encode() + (line if isinstance(line, bytes) else line.encode()) + b"\n")
  # 4 clients of a 2-record file: the bad record is named before any partition complains
  with pytest.raises(ValueError, match=match):
    build.build(_cfg(data__train_file=str(bad), fed__num_clients=4, data__batch_size=1,
                     dp__delta=0.1, dp__allow_large_delta=True))


def test_empty_and_unknown_task_files(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match=r"empty.jsonl: no records \(an empty eval file\)"):
    build.build(_cfg(data__eval_file=str(empty)))
  with pytest.raises(ValueError, match=r"unknown task 'tfsn' \(did you mean tfns"):
    _cfg(data__task="tfsn")
  with pytest.raises(ValueError, match=r"task 'fiqa_sa' ships no train data"):
    build.build(_cfg(data__task="fiqa_sa"))
