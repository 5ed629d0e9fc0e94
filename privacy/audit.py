"""Empirical membership-inference audit of a trained model (evidence, never a proof).

Members are the training users of the clients whose updates the server used (its aggregation
ledger, status "used"); non-members are the users those same clients held out of training (run
config `audit-holdout`), drawn by the same stable hash. Taking both from the same clients keeps
the two groups from one population: held-out users of clients that never trained would differ
by region, and a model fitted to some regions tells its regions' users apart from others'
without any membership signal. Users map to clients with `common.data.partition.plan`/`select`, as
the simulated clients pick their own users, so the audit needs the run's data and a simulation.

Two attacks, each scored by its ROC (AUC and the true-positive rate at low false-positive rates):

- loss threshold (Yeom et al., 2018): a lower next-item loss on the user's own sequence under
  the final model = guessed member;
- offline LiRA (Carlini et al., 2022, "Membership Inference Attacks From First Principles"):
  reference models trained without privacy on random halves of the audited users, in pairs of
  complementary halves so that every user is left out of exactly half of them; each user's
  logit-scaled confidence under the references that never saw them is their OUT distribution
  (per-user mean, one global variance, which Carlini et al. recommend with few references), and
  the score is how far above it the final model's confidence lies. Calibrating each user against
  their own difficulty is what makes TPR at low FPR meaningful: the loss attack mostly flags
  users who are easy for any model.

The ε shown is the largest `epsilon_after` in the ledgers of the clients that trained — what
the clients themselves signed — not the model card's copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from common.atomic import write_json
from common.data.partition import audit_non_members, plan, select
from common.data.sequences import Batch, Sequences
from common.data.sources import run_events
from common.learning.dataset import catalog_shape, prepare
from common.learning.inference import load_exported
from common.learning.model import BehaviorModel, CatalogShape, per_user_loss
from common.learning.training import adam, loader, pick_device, train_epoch
from common.run_files import AUDIT, CLIENT_LEDGER, CLIENTS, ROUNDS, SERVER_LEDGER
from common.runconfig import RunConfig
from privacy.ledger import Aggregation, entries
from privacy.verify import verify_paths

ATTACKS = {
    "loss": (
        "Loss threshold (Yeom et al. 2018): each user's next-item loss on their own training "
        "sequence under the final model; lower loss = guessed member."
    ),
    "lira": (
        "Offline LiRA (Carlini et al. 2022): the final model's logit-scaled confidence on each "
        "user's sequence against a Gaussian fitted to that user's confidence under reference "
        "models trained without them (non-private, same model config); higher = member."
    ),
}
SCOPE = (
    "Members: training users of the clients whose updates the server used; non-members: the "
    "users those clients held out (audit-holdout)."
)
FPRS = (0.01, 0.001)
# One row per run and attack, in the report's table and the CLI's alike
COLUMNS = (
    "run",
    "ε (ledger)",
    "attack",
    "AUC",
    "TPR @ 1% FPR",
    "TPR @ 0.1% FPR",
    "members / non-members",
)
REFERENCES = 2
Reference = Callable[[Sequences, int], torch.nn.Module]


@torch.no_grad()
def user_losses(model: torch.nn.Module, seqs: Sequences, batch_size: int = 256) -> np.ndarray:
    """Each user's mean next-item cross-entropy over their own training sequence."""
    model.eval()
    out = [
        per_user_loss(model, Batch(*batch).trim(), demand_weight=0.0)[1]
        for batch in loader(seqs, batch_size, shuffle=False)
    ]
    return torch.cat(out).numpy().astype(np.float64)


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


def logit_confidence(losses: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) for p = exp(-loss): LiRA's scale, on which confidences are close to
    Gaussian (a loss of exactly 0 would be an infinite confidence, hence the floor)."""
    losses = np.maximum(losses, 1e-9)
    return -losses - np.log(-np.expm1(-losses))


def out_losses(seqs: Sequences, reference: Reference, references: int, seed: int) -> np.ndarray:
    """[references / 2, users]: each user's loss under the references that left them out.

    Reference models come in pairs trained on complementary random halves of `seqs`, so every
    user is OUT for exactly one model of each pair (offline LiRA never needs IN models).
    """
    if references < 2 or references % 2:
        raise ValueError(f"references must be an even number ≥ 2, not {references}")
    rng = np.random.default_rng(seed)
    out = np.empty((references // 2, len(seqs)))
    for pair in range(references // 2):
        half = rng.permutation(len(seqs)) < len(seqs) // 2
        for k, trained_on in enumerate((half, ~half)):
            model = reference(seqs.subset(np.flatnonzero(trained_on)), seed + 2 * pair + k)
            out[pair, ~trained_on] = user_losses(model, seqs.subset(np.flatnonzero(~trained_on)))
    return out


def lira_scores(target_losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """One-sided offline LiRA statistic: (φ_target − μ_out) / σ_out per user, φ the logit-scaled
    confidence, μ_out the user's mean over their OUT references, σ_out one global deviation
    (pooled within users when each has several references, else across users)."""
    target = logit_confidence(target_losses)
    ref = logit_confidence(reference_losses)
    mean = ref.mean(axis=0)
    spread = np.sqrt(ref.var(axis=0, ddof=1).mean()) if len(ref) > 1 else ref.std()
    return (target - mean) / max(float(spread), 1e-12)


def train_reference(cfg: RunConfig, shape: CatalogShape) -> Reference:
    """Non-private references with the audited model's config: Adam at the run's learning rate
    and batch size, for as many passes as each client made (rounds × local epochs)."""
    device = pick_device()

    def train(seqs: Sequences, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = BehaviorModel(cfg.model, shape).to(device)
        optimizer = adam(model, cfg.lr)
        for epoch in range(cfg.num_server_rounds * cfg.local_epochs):
            batches = loader(seqs, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch)
            train_epoch(model, batches, optimizer, device, cfg.model.demand_weight)
        return model.cpu()

    return train


def used_clients(run_dir: Path) -> set[str]:
    """Clients whose update went into an aggregate at least once (the server's ledger)."""
    path = run_dir / SERVER_LEDGER
    if not path.exists():
        raise ValueError(f"{path}: missing; the audit takes the clients that trained from it")
    return {
        c.client
        for record in entries(path, Aggregation)
        for c in record.clients
        if c.status == "used"
    }


def client_users(events: pd.DataFrame, run_dir: Path, clients: set[str]) -> np.ndarray:
    """The user ids of `clients`, split out of `events` as the simulation's clients do.

    Every sampled client answers each round (trained, declined or failed), so the longest
    round in `rounds.json` gives the number of partitions.
    """
    path = run_dir / ROUNDS
    if not path.exists():
        raise ValueError(f"{path}: missing; the audit counts the run's clients from it")
    history = json.loads(path.read_text(encoding="utf-8"))
    count = max((len(record["clients"]) for record in history), default=0)
    parts = {p.name: p for p in plan(events, max(count, len(clients)))} if count else {}
    unknown = sorted(clients - parts.keys())
    if unknown:
        raise ValueError(
            f"{run_dir}: client(s) {', '.join(unknown)} are not partitions of the run's data "
            "into its clients; the audit can only map the users of a simulated run"
        )
    users = [select(events, parts[name])["user_id"].astype(str).unique() for name in clients]
    return np.concatenate(users) if users else np.array([], dtype=str)


def ledger_epsilon(run_dir: Path, clients: set[str]) -> float:
    """The largest ε any of `clients` spent, from their ledgers in the run folder, each of
    which must verify on its own (chain, signature with the key beside it, arithmetic): an
    altered ledger's figure is never reported."""
    paths = sorted((run_dir / CLIENTS).glob(f"*/{CLIENT_LEDGER}"))
    reports = [r for r in verify_paths(paths) if r.kind == "client" and r.signer in clients]
    bad = next((r for r in reports if not r.ok), None)
    if bad is not None:
        raise ValueError(f"{bad.first_problem()}; the audit takes ε only from ledgers that verify")
    spent = [r.spends[-1].epsilon_after for r in reports if r.spends]
    if not spent:
        raise ValueError(f"{run_dir}: no privacy ledger entry from {', '.join(sorted(clients))}")
    return max(spent)


def audit_run(run_dir: Path, references: int = REFERENCES) -> dict:
    """Attack one run's exported model with the users of the clients it was trained on."""
    exported = load_exported(run_dir)
    cfg = RunConfig.from_flower(exported.card["run_config"])
    if cfg.audit_holdout <= 0:
        raise ValueError(
            f"{run_dir}: trained with audit-holdout 0, so there are no non-members to test "
            "against; rerun with --audit-holdout (e.g. 0.1)"
        )
    clients = used_clients(run_dir)
    if not clients:
        raise ValueError(f"{run_dir}: no client update was ever used, so there are no members")
    events, top_chars = run_events(
        cfg.data, cfg.format, cfg.synth.model_dump_json(), cfg.spec, cfg.columns
    )
    prepared = prepare(
        events,
        top_category_chars=top_chars,
        history_len=cfg.model.history,
        catalog=exported.catalog,
    )
    users = client_users(events, run_dir, clients)
    seqs = prepared.train.subset(np.flatnonzero(np.isin(prepared.train.users.astype(str), users)))
    outsider = audit_non_members(seqs.users, cfg.audit_holdout)
    if outsider.all() or not outsider.any():
        raise ValueError(
            f"{run_dir}: {int((~outsider).sum())} member(s) and {int(outsider.sum())} "
            "non-member(s); an attack needs both"
        )
    target = user_losses(exported.model, seqs)
    reference = train_reference(cfg, catalog_shape(exported.catalog))
    lira = lira_scores(target, out_losses(seqs, reference, references, cfg.seed))
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "dp": cfg.dp,
        "epsilon": round(ledger_epsilon(run_dir, clients), 3) if cfg.dp else "∞ (no DP)",
        "clients": sorted(clients),
        "members": int((~outsider).sum()),
        "non_members": int(outsider.sum()),
        "references": references,
        "attacks": {
            "loss": roc_summary(-target[~outsider], -target[outsider]),
            "lira": roc_summary(lira[~outsider], lira[outsider]),
        },
    }


def audit(run_dirs: list[Path], references: int = REFERENCES) -> dict:
    """Audit runs side by side; the result is also written to each run's `audit.json`."""
    result = {
        "attacks": ATTACKS,
        "scope": SCOPE,
        "runs": [audit_run(d, references) for d in run_dirs],
    }
    for d in run_dirs:
        write_json(d / AUDIT, result)
    return result
