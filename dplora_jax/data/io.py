"""Reading task data from local files: jsonl, json, csv, parquet, a `datasets.save_to_disk`
directory, or a packaged copy; fixed-seed train/test parts of a file.

Every error names the file (and the line for jsonl), so a user can find the bad record.

A source is `PATH` or `PATH::PART` with PART `train` or `test`: the file's records shuffled with
the fixed seed `SPLIT_SEED` and cut at `test_fraction` (the task's), the test part first. The
same file and fraction always give the same parts, on every machine.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

SPLIT_SEED = 20231229  # the paper's arXiv date; fixed forever: changing it reshuffles every split
PARTS = ("train", "test")
# data.eval_examples: the same held-out rows for every run and for launch.eval
EVAL_SUBSET_SEED = 1234


class Records(list):
  """A list of record dicts that remembers where each came from (`where(i)`: "file:line")."""

  def __init__(self, items=(), source: str = "data", lines=None):
    super().__init__(items)
    self.source = source
    self.lines = list(lines) if lines is not None else [None] * len(self)

  def where(self, i: int) -> str:
    line = self.lines[i]
    return f"{self.source}:{line}" if line is not None else f"{self.source} record {i}"

  def take(self, idx) -> "Records":
    idx = [int(i) for i in idx]
    return Records([self[i] for i in idx], self.source, [self.lines[i] for i in idx])


def packaged(name: str) -> str:
  """Path of a file shipped with the package, e.g. 'tfns/train.jsonl'."""
  return os.path.join(os.path.dirname(__file__), name)


def resolve(path: str) -> str:
  """A path as given if it exists (or is absolute), else the packaged copy of that name."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  return packaged(path) if os.path.exists(packaged(path)) else path


def _decode_error(path: str, e: UnicodeDecodeError, text_bytes: bytes | None = None) -> ValueError:
  where = ""
  if text_bytes is not None:
    line = text_bytes[:e.start].count(b"\n") + 1
    where = f" line {line},"
  return ValueError(f"{path}:{where} byte {e.start} is not UTF-8 ({e.reason}); save the file as "
                    "UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _decode_error(path, e, raw) from None


def _read_jsonl(path: str) -> Records:
  items, lines = [], []
  for i, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: U+2028 is text
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not valid JSON ({e}).") from None
    if not isinstance(r, dict):
      raise ValueError(f"{path}:{i}: expected a JSON object per line, got {type(r).__name__}.")
    items.append(r)
    lines.append(i)
  return Records(items, path, lines)


def _read_json(path: str) -> Records:
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from None
  if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
    lists = [v for v in data.values() if isinstance(v, list)]
    if len(lists) != 1:
      raise ValueError(f"{path}: expected a JSON list of records (or an object holding one).")
    data = lists[0]
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise ValueError(f"{path}: expected a JSON list of objects.")
  return Records(data, path)


def _read_csv(path: str) -> Records:
  import io
  rows = csv.DictReader(io.StringIO(_read_text(path), newline=""))
  items = list(rows)
  return Records(items, path, [i + 2 for i in range(len(items))])  # line 1 is the header


def _need_datasets(path: str):
  import importlib.util
  if importlib.util.find_spec("datasets") is None:
    raise ValueError(f"{path}: reading parquet files and `datasets` directories needs the "
                     "`datasets` package: pip install 'dplora_jax[data]'.")


def _read_parquet(path: str) -> Records:
  _need_datasets(path)
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises its own error types
    raise ValueError(f"{path}: not a readable parquet file ({e}).") from None
  return Records(table.to_pylist(), path)


def _read_hf_dir(path: str, split: str | None) -> Records | None:
  _need_datasets(path)
  import datasets
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # FileNotFoundError or datasets' own errors
    raise ValueError(f"{path}: not a `datasets` save_to_disk directory ({e}).") from None
  if isinstance(ds, datasets.DatasetDict):
    if split is None:
      if len(ds) != 1:
        raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}; name one as "
                         f"{path}::SPLIT.")
      split = next(iter(ds))
    if split not in ds:
      raise ValueError(f"{path}: no split {split!r}; it has {sorted(ds)}.")
    ds = ds[split]
    path = f"{path}::{split}"
  elif split is not None:  # a single Dataset: PATH::train / ::test are its fixed-seed parts
    if split not in PARTS:
      raise ValueError(f"{path}: a single Dataset has no split {split!r}.")
    return None
  return Records(list(ds), path)


def read_records(path: str) -> Records:
  """Reads .jsonl, .json (a list), .csv, .parquet or a `datasets` directory.

  Raises:
    FileNotFoundError / ValueError naming the file (and line for jsonl).
  """
  if os.path.isdir(path):
    return _read_hf_dir(path, None)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} not found.")
  if path.endswith(".jsonl"):
    return _read_jsonl(path)
  if path.endswith(".json"):
    return _read_json(path)
  if path.endswith(".csv"):
    return _read_csv(path)
  if path.endswith(".parquet"):
    return _read_parquet(path)
  raise ValueError(f"data file {path!r}: expected .jsonl, .json, .csv, .parquet or a `datasets` "
                   "directory.")


def split_indices(n: int, test_fraction: float) -> dict[str, np.ndarray]:
  """{"train": idx, "test": idx}: a fixed-seed permutation of range(n), the test part first."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(n)
  n_test = int(round(n * test_fraction))
  return {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}


def parse_source(spec: str) -> tuple[str, str | None]:
  """'path::part' -> (path, part); 'path' -> (path, None)."""
  path, sep, part = spec.rpartition("::")
  return (path, part) if sep else (spec, None)


def read_source(spec: str, test_fraction: float = 0.0, reader=read_records) -> Records:
  """The records of `spec` (`PATH` or `PATH::train|test`, or a `datasets` directory split).

  Raises:
    ValueError: an unknown part, or a split of a task without a test fraction.
  """
  path, part = parse_source(spec)
  path = resolve(path)
  if os.path.isdir(path) and part is not None:
    split = _read_hf_dir(path, part)  # a DatasetDict's split of that name
    if split is not None:
      return split
  records = reader(path)
  if part is None:
    return records
  if part not in PARTS:
    raise ValueError(f"{spec}: unknown part {part!r}; expected {PARTS[0]!r} or {PARTS[1]!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"{spec}: this task defines no train/test split of one file; pass the "
                     "file without '::{part}'.")
  return records.take(split_indices(len(records), test_fraction)[part])


def subsample(records: Records, n: int, seed: int) -> Records:
  """At most n records, a fixed-seed uniform subset in file order (all when n is 0)."""
  if not n or len(records) <= n:
    return records
  return records.take(np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False)))
