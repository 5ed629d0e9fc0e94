"""The final model as safetensors plus a JSON model card (config, data, privacy, metrics)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from safetensors.numpy import save_file

from common.atomic import write_json, write_with
from common.digest import DIGEST, array_digest
from common.learning.configs import ModelConfig
from common.learning.model import CatalogShape
from common.run_files import CARD, CATALOG, MODEL


def export(
    out: Path,
    arrays: ArrayRecord,
    model_cfg: ModelConfig,
    shape: CatalogShape,
    card: dict,
) -> Path:
    tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}
    # The weights carry their own SHA-256 (checked by `common.learning.inference`).
    meta = {DIGEST: array_digest(tensors)}
    write_with(out / MODEL, lambda p: save_file(tensors, str(p), metadata=meta))
    write_json(
        out / CARD,
        {
            "model": "fedshop BERT behavior model",
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": model_cfg.model_dump(),
            "catalog_shape": shape.model_dump(),
            "weights": MODEL,
            "catalog": CATALOG,
            **card,
        },
    )
    return out / MODEL
