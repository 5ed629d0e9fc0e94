"""Per-round checkpoints: model, strategy state, round and history in one atomic file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from common.atomic import write_with
from common.digest import DIGEST, array_digest
from common.run_files import CHECKPOINT

# Server-optimizer state of Flower's FedOpt family (FedAdam, FedYogi, ...); FedAvg has none.
STRATEGY_STATE = ("current_arrays", "m_t", "v_t")


@dataclass
class Checkpoint:
    server_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    central_accountant: dict | None = None  # Flower's accountant state, client-level DP


def save(out: Path, ckpt: Checkpoint) -> Path:
    tensors = {f"model/{k}": np.ascontiguousarray(v.numpy()) for k, v in ckpt.arrays.items()}
    for attr, arrays in ckpt.strategy_state.items():
        tensors |= {f"strategy/{attr}/{k}": np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {
        # safetensors sorts names; Flower's DP wrappers pair arrays by position, so keep order
        "order": json.dumps(list(ckpt.arrays.keys())),
        "round": str(ckpt.server_round),
        "history": json.dumps(ckpt.history),
        "central-accountant": json.dumps(ckpt.central_accountant),
    }
    meta[DIGEST] = array_digest(tensors, meta)
    return write_with(out / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=meta))


def load(out: Path, like: Mapping[str, Any] | None = None) -> Checkpoint | None:
    """The run's checkpoint, or None when there is none. A damaged one, or (given `like`, the
    arrays of the model this run builds) one of another model's shape, is a ValueError naming
    the file and the problem: resuming from it would train a different or broken model."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        expected = meta.pop(DIGEST, None)
        if expected is not None and expected != array_digest(tensors, meta):
            raise ValueError("its checksum does not match: the file was altered or damaged")
        server_round = int(meta["round"])
        history = json.loads(meta["history"])
        central = json.loads(meta.get("central-accountant", "null"))
        model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
        model = {k: model[k] for k in json.loads(meta.get("order", "null")) or model}
        state: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            if key.startswith("strategy/"):
                _, attr, name = key.split("/", 2)
                state.setdefault(attr, {})[name] = value
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoint is corrupt or incomplete ({exc})") from exc
    if like is not None:
        for arrays in (model, *state.values()):
            _same_shapes(path, arrays, like)
    return Checkpoint(
        server_round,
        ArrayRecord({k: torch.from_numpy(v) for k, v in model.items()}),
        state,
        history,
        central,
    )


def _same_shapes(path: Path, arrays: Mapping[str, np.ndarray], like: Mapping[str, Any]) -> None:
    missing = [k for k in like if k not in arrays]
    extra = [k for k in arrays if k not in like]
    wrong = [k for k in like if k in arrays and tuple(arrays[k].shape) != tuple(like[k].shape)]
    if not (missing or extra or wrong):
        return
    if wrong:
        k = wrong[0]
        what = f"{k!r} is {tuple(arrays[k].shape)}, this run's model needs {tuple(like[k].shape)}"
    else:
        what = f"arrays missing: {missing[:3]}" if missing else f"arrays unknown here: {extra[:3]}"
    raise ValueError(
        f"{path}: checkpoint is from another model shape ({len(missing) + len(extra) + len(wrong)}"
        f" array(s) differ, e.g. {what}); resume with the run's own model settings and "
        "catalog, or start over without resuming"
    )


def strategy_state(strategy: object) -> dict[str, dict[str, np.ndarray]]:
    return {
        a: dict(getattr(strategy, a))
        for a in STRATEGY_STATE
        if isinstance(getattr(strategy, a, None), dict)
    }


def restore_strategy(strategy: object, state: dict[str, dict[str, np.ndarray]]) -> None:
    for attr, arrays in state.items():
        setattr(strategy, attr, arrays)
