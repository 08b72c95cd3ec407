"""Every source of DP randomness of a run, from one secret root.

The DP-noise key, the per-example Poisson sampler (and its truncation choice) and the client
sampler all derive from one 256-bit root drawn from the OS entropy pool (`os.urandom`). Nobody who
knows the config (it is in summary.json) can regenerate them, which both the noise and the
amplification by sampling that the accountant credits rely on. `dp.reproducible_seed >= 0` seeds
the root instead, for reproductions: then anyone with the config can regenerate the noise and
the samples, and the report says so. The config's `seed` never feeds any of these streams; it
governs init, partitions and data order only.

The root and the generators' states live in the checkpoint (owner-only) so that a resumed run is
the same run; they never leave it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

# Children of the root, one per purpose; each feeds one thing only.
NOISE, EXAMPLES, CLIENTS = 0, 1, 2


def _key_from(seq: np.random.SeedSequence) -> jax.Array:
  shape = jax.random.key_data(jax.random.key(0)).shape
  data = seq.generate_state(int(np.prod(shape)), np.uint32).reshape(shape)
  return jax.random.wrap_key_data(data)


class DPRandomness:
  """The run's secret randomness.

  Attributes:
    source: "os-entropy" or "reproducible seed N (not secret)".
    noise_key: the DP-noise key (clients and server derive per-round keys from it).
    example_rng: numpy Generator of the per-example Poisson sampler and its truncation.
    client_rng: numpy Generator of client sampling.
  """

  def __init__(self, reproducible_seed: int = -1, *, _root: int | None = None):
    if _root is not None:
      root = _root
    elif reproducible_seed >= 0:
      root = int(reproducible_seed)
    else:
      root = int.from_bytes(os.urandom(32), "little")
    self.reproducible_seed = reproducible_seed
    self.source = ("os-entropy" if reproducible_seed < 0 else
                   f"reproducible seed {reproducible_seed} (not secret: anyone with the config can "
                   "regenerate the noise and the samples)")
    self._root = root
    children = np.random.SeedSequence(root).spawn(3)
    self.noise_key = _key_from(children[NOISE])
    self.example_rng = np.random.default_rng(children[EXAMPLES])
    self.client_rng = np.random.default_rng(children[CLIENTS])

  @property
  def secret(self) -> bool:
    return self.reproducible_seed < 0

  def state(self) -> dict:
    """JSON-serialisable state (secret: written only into the owner-only checkpoint)."""
    return {"root": hex(self._root), "reproducible_seed": self.reproducible_seed,
            "example_rng": self.example_rng.bit_generator.state,
            "client_rng": self.client_rng.bit_generator.state}

  @classmethod
  def from_state(cls, state: dict) -> "DPRandomness":
    r = cls(int(state["reproducible_seed"]), _root=int(state["root"], 16))
    r.example_rng.bit_generator.state = state["example_rng"]
    r.client_rng.bit_generator.state = state["client_rng"]
    return r
