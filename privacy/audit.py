"""Empirical membership-inference audit of a trained model (evidence, never a proof).

The attack is the loss threshold attack (Yeom et al., 2018): a user whose own training
sequence the final model predicts unusually well is guessed to have been trained on. Members
are the users the clients trained on; non-members are the users each client held out of training
(run config `audit-holdout`), drawn by the same stable hash, so both come from the same
population. Attack quality is its ROC: AUC and the true-positive rate at low false-positive rates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from common.atomic import write_json
from common.dataset import prepare
from common.inference import load_exported
from common.model import per_user_loss
from common.partition import audit_non_members
from common.runconfig import RunConfig
from common.sequences import Batch, Sequences
from common.sources import run_events
from common.training import loader

ATTACK = (
    "Loss-threshold membership inference (Yeom et al. 2018): each user's next-item loss on "
    "their own training sequence under the final model; lower loss = guessed member. Members "
    "are users the clients trained on, non-members users they held out (audit-holdout)."
)
FPRS = (0.01, 0.001)


@torch.no_grad()
def user_losses(model: torch.nn.Module, seqs: Sequences, batch_size: int = 256) -> np.ndarray:
    """Each user's mean next-item cross-entropy over their own training sequence."""
    model.eval()
    out = [
        per_user_loss(model, Batch(*batch).trim(), demand_weight=0.0)[1]
        for batch in loader(seqs, batch_size, shuffle=False)
    ]
    return torch.cat(out).numpy()


def roc_summary(members: np.ndarray, non_members: np.ndarray) -> dict:
    """AUC (probability a member scores above a non-member) and TPR at fixed low FPRs."""
    ranks = rankdata(np.concatenate([members, non_members]))
    m, n = len(members), len(non_members)
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    tpr = {}
    for fpr in FPRS:
        threshold = np.quantile(non_members, 1 - fpr, method="higher")
        tpr[str(fpr)] = float((members > threshold).mean())
    return {"auc": float(auc), "tpr_at_fpr": tpr}


def audit_run(run_dir: Path) -> dict:
    """Attack one run's exported model with the users of the data it was trained on."""
    exported = load_exported(run_dir)
    cfg = RunConfig.from_flower(exported.card["run_config"])
    if cfg.audit_holdout <= 0:
        raise ValueError(
            f"{run_dir}: trained with audit-holdout 0, so there are no non-members to test "
            "against; rerun with --audit-holdout (e.g. 0.1)"
        )
    events, top_chars = run_events(cfg.data, cfg.format, cfg.synth.model_dump_json())
    prepared = prepare(
        events,
        top_category_chars=top_chars,
        history_len=cfg.model.history,
        catalog=exported.catalog,
    )
    train = prepared.train
    outsider = audit_non_members(train.users, cfg.audit_holdout)
    scores = -user_losses(exported.model, train)
    privacy = exported.card.get("privacy", {})
    spent = [c["epsilon"] for c in privacy.get("clients", {}).values() if "epsilon" in c]
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "dp": cfg.dp,
        "epsilon": round(max(spent), 3) if cfg.dp and spent else "∞ (no DP)",
        "members": int((~outsider).sum()),
        "non_members": int(outsider.sum()),
        **roc_summary(scores[~outsider], scores[outsider]),
    }


def audit(run_dirs: list[Path]) -> dict:
    """Audit runs side by side; the result is also written to each run's `audit.json`."""
    result = {"attack": ATTACK, "runs": [audit_run(d) for d in run_dirs]}
    for d in run_dirs:
        write_json(d / "audit.json", result)
    return result
