"""Every source of DP randomness of a run, from one secret root.

The DP-noise key, the per-example Poisson sampler (and its truncation choice) and the client
sampler all derive from one 256-bit root drawn from the OS entropy pool (`os.urandom`). The
samplers are stateless streams, one per (purpose, client, round) (numpy `SeedSequence` spawn
keys), so a client that trains in its own process (`dplora_jax.deploy`) draws exactly what the
one-program simulation draws for it, and a resumed run needs only the root. Nobody who
knows the config (it is in summary.json) can regenerate them, which both the noise and the
amplification by sampling that the accountant credits rely on. `dp.reproducible_seed >= 0` seeds
the root instead, for reproductions: then anyone with the config can regenerate the noise and
the samples, and the report says so. The config's `seed` never feeds any of these streams; it
governs init, partitions and data order only.

The root lives in the checkpoint (owner-only; a deployed client keeps its own in its state
directory) so that a resumed run is the same run; it never leaves it.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

# Children of the root, one per purpose; each feeds one thing only.
NOISE, EXAMPLES, CLIENTS, CENTRE = 0, 1, 2, 3


def _key_from(seq: np.random.SeedSequence) -> jax.Array:
  shape = jax.random.key_data(jax.random.key(0)).shape
  data = seq.generate_state(int(np.prod(shape)), np.uint32).reshape(shape)
  return jax.random.wrap_key_data(data)


class DPRandomness:
  """The run's secret randomness.

  Attributes:
    source: "os-entropy" or "reproducible seed N (not secret)".
    noise_key: the DP-noise key (clients and server derive per-round keys from it).
    centre_key: the key of the centred LoRA's release (`lora.centre`), used once per run.
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
    self.noise_key = _key_from(np.random.SeedSequence(root, spawn_key=(NOISE,)))
    # the noise of the centred LoRA's one release (`federated.centre`), its own stream
    self.centre_key = _key_from(np.random.SeedSequence(root, spawn_key=(CENTRE,)))

  def examples(self, client: int, round_: int) -> np.random.Generator:
    """The generator of client `client`'s Poisson samples (and truncation) in round `round_`
    (0-based): a fresh stream of its own, the same in every process that holds the root."""
    return np.random.default_rng(np.random.SeedSequence(
        self._root, spawn_key=(EXAMPLES, int(client), int(round_))))

  def clients(self, round_: int) -> np.random.Generator:
    """The generator of round `round_`'s client sample (the server's)."""
    return np.random.default_rng(np.random.SeedSequence(self._root,
                                                        spawn_key=(CLIENTS, int(round_))))

  def with_root(self, share) -> "DPRandomness":
    """This randomness with root `share(root)` (a multi-process run: process 0's root in every
    process, `distributed.share_root`)."""
    return DPRandomness(self.reproducible_seed, _root=share(self._root))

  def digest(self) -> bytes:
    """SHA-256 of the root: compares roots across the run's own processes without sending
    them (never released)."""
    return hashlib.sha256(self._root.to_bytes(64, "little")).digest()

  @property
  def secret(self) -> bool:
    return self.reproducible_seed < 0

  def state(self) -> dict:
    """JSON-serialisable state (secret: written only into owner-only files)."""
    return {"root": hex(self._root), "reproducible_seed": self.reproducible_seed}

  @classmethod
  def from_state(cls, state: dict) -> "DPRandomness":
    """The randomness of `state()` (a format-2 checkpoint's generator states are not needed: the
    streams are functions of the root)."""
    return cls(int(state["reproducible_seed"]), _root=int(state["root"], 16))
