"""Where a client's DP randomness comes from: the operating system, never the run's seed.

Amplification by sampling, which the accountant assumes, holds only if nobody can tell which
users a step sampled; the noise protects only if nobody can predict it. The run seed is public
(it is in the model card), so nothing here may depend on it. Opacus' `secure_mode` would draw
from `torchcsprng`, which does not build against current torch; instead every round gets fresh
generators seeded from `os.urandom` (64 bits for PyTorch, which takes no more; 128 for NumPy).
The seeds are unpredictable, but the generators (PyTorch's Mersenne Twister on CPU, Philox on
CUDA; NumPy's PCG64) are not cryptographic: someone who saw enough of their raw output could
reconstruct their state. Only clipped-and-noised sums leave a client, never raw draws, so that
is a residual, stated risk.
"""

from __future__ import annotations

import os

import numpy as np
import torch

RANDOMNESS = (
    "DP sampling and noise come from generators freshly seeded from the operating system "
    "(os.urandom) every round, never from the run seed. The generators themselves "
    "(PyTorch's Mersenne Twister / Philox, NumPy's PCG64) are not cryptographically secure "
    "(Opacus' secure mode needs torchcsprng, which does not build with current torch): an "
    "observer of enough raw draws could predict later ones, but only noised sums leave a client."
)


def _seed_bits(bits: int) -> int:
    return int.from_bytes(os.urandom(bits // 8), "little")


def torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device`, seeded from OS entropy (torch takes 64 bits)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_bits(64))
    return gen


def numpy_generator() -> np.random.Generator:
    """A fresh PCG64 generator seeded with 128 bits of OS entropy."""
    return np.random.default_rng(_seed_bits(128))


def gaussian_release(values: np.ndarray, std: float) -> np.ndarray:
    """`values` plus independent N(0, std²) noise from a fresh OS-seeded generator."""
    return values + numpy_generator().normal(0.0, std, size=np.shape(values))
