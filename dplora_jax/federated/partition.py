"""Splitting a dataset into K clients."""

from __future__ import annotations

import numpy as np


def partition(labels: np.ndarray, num_clients: int, *, method: str = "iid", alpha: float = 1.0,
              field_values: list | None = None, seed: int = 0) -> list[np.ndarray]:
  """Indices of each client's examples.

  Args:
    labels: [N] int labels (used by "dirichlet").
    num_clients: K.
    method: "iid" (shuffled, even split), "dirichlet" (per-label client shares drawn from
      Dirichlet(alpha)), or "field" (one client per distinct value of `field_values`).
    alpha: Dirichlet concentration; small = skewed.
    field_values: [N] values for "field".
    seed: host RNG seed.

  Raises:
    ValueError: more clients than examples, an empty client, or a field with a different number
      of distinct values than clients.
  """
  n = len(labels)
  rng = np.random.default_rng(seed)
  if num_clients > n:
    raise ValueError(f"fed.num_clients={num_clients} exceeds the {n} training examples.")
  if method == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)
  elif method == "dirichlet":
    parts = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].extend(chunk.tolist())
    parts = [np.sort(np.asarray(p, np.int64)) for p in parts]
  elif method == "field":
    if field_values is None:
      raise ValueError("fed.partition='field' needs the field's values.")
    values = sorted(set(map(str, field_values)))
    if len(values) != num_clients:
      raise ValueError(f"fed.partition_field has {len(values)} distinct values {values[:10]}; "
                       f"fed.num_clients={num_clients} must equal that number.")
    keyed = np.asarray([str(v) for v in field_values])
    parts = [np.flatnonzero(keyed == v) for v in values]
  else:
    raise ValueError(f"fed.partition={method!r}; expected 'iid', 'dirichlet' or 'field'.")
  for k, p in enumerate(parts):
    if len(p) == 0:
      raise ValueError(f"client {k} is empty after fed.partition={method!r} "
                       f"(alpha={alpha}); use more data, fewer clients or a larger alpha.")
  return [np.asarray(p, np.int64) for p in parts]
