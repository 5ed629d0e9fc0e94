"""Per-round checkpoints: model, strategy state, round and history in one atomic file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from common.atomic import write_with
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
    return write_with(out / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=meta))


def load(out: Path) -> Checkpoint | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        server_round = int(meta["round"])
        history = json.loads(meta["history"])
        central = json.loads(meta.get("central-accountant", "null"))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: checkpoint is corrupt or incomplete ({exc})") from exc
    model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    model = {k: model[k] for k in json.loads(meta.get("order", "null")) or model}
    state: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key.startswith("strategy/"):
            _, attr, name = key.split("/", 2)
            state.setdefault(attr, {})[name] = value
    return Checkpoint(
        server_round,
        ArrayRecord({k: torch.from_numpy(v) for k, v in model.items()}),
        state,
        history,
        central,
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
