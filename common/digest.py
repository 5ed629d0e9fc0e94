"""SHA-256 of a set of named arrays, for files whose format checks layout but not content.

safetensors validates a file's header and sizes, not its bytes: a flipped bit in a weight loads
silently. Checkpoints (`server.checkpoint`) and exported models (`server.export`) store this
digest in their safetensors metadata and check it on load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

DIGEST = "sha256"  # the metadata key that holds it


def array_digest(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> str:
    """SHA-256 over the metadata (sorted JSON), then every array in name order: its name, dtype,
    shape and bytes."""
    h = hashlib.sha256(json.dumps(dict(meta or {}), sort_keys=True).encode())
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, value.dtype.str, value.shape]).encode())
        h.update(value.tobytes())
    return h.hexdigest()
