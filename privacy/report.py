"""The compliance report: its facts, gathered from the signed ledgers and their independent
verification (never from what the training run says about itself), written as JSON and as the
page `privacy.report_page` renders from the same facts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from common.atomic import write_json, write_text
from common.run_files import (
    AUDIT,
    CARD,
    CLIENT_LEDGER,
    CLIENTS,
    PRIVACY_REPORT_HTML,
    PRIVACY_REPORT_JSON,
    SERVER_LEDGER,
)
from privacy.accounting import Mechanism
from privacy.ledger import Finding
from privacy.report_page import render
from privacy.verify import LedgerReport, Verdict, verify_paths


def find_ledgers(run_dir: Path) -> list[Path]:
    """The server's record and the simulated clients' ledgers of a run folder (deployed
    clients' ledgers live with their data and are passed in). Only the clients' folder is
    searched: Flower copies the whole app, test fixtures included, into the run's `.flwr`."""
    found = sorted((run_dir / CLIENTS).glob(f"*/{CLIENT_LEDGER}"))
    server = run_dir / SERVER_LEDGER
    return ([server] if server.exists() else []) + found


def client_summary(r: LedgerReport) -> dict:
    """One client's budget, spend, mechanism (fixed by its first entry) and rounds, as verified."""
    last = r.spends[-1]
    first = r.spends[0]
    return {
        "client": r.signer,
        "ledger": r.path,
        "verified": r.ok,
        "problem": None if r.ok else r.first_problem(),
        "key": r.key_source,
        "budget": {"epsilon": last.budget_epsilon, "delta": last.delta},
        "spent_epsilon": last.epsilon_after,
        "remaining_epsilon": max(last.budget_epsilon - last.epsilon_after, 0.0),
        "mechanism": first.model_dump(include=set(Mechanism.model_fields)),
        "declined_rounds": [s.server_round for s in r.spends if s.status == "declined"],
        "rounds": [
            {
                "round": e.server_round,
                "status": e.status,
                "steps": s.steps,
                "epsilon_before": s.epsilon_before,
                "epsilon_after": s.epsilon_after,
                "spent": s.epsilon_after - s.epsilon_before,
                "recomputed": e.recomputed,
                "time": s.time,
            }
            for e, s in zip(r.entries, r.spends, strict=True)
        ],
    }


def secure_rounds(reports: list[LedgerReport]) -> list[dict]:
    """The server's rounds and their SecAgg+ settings (None: the round's updates came in clear)."""
    return [
        {"round": rec.server_round, "secure_aggregation": rec.secure_aggregation}
        for r in reports
        if r.kind == "server"
        for rec in r.records
        if rec.step == "train"
    ]


def build(run_dir: Path, ledgers: list[Path] | None = None, keys: Path | None = None) -> dict:
    """The report's facts, JSON-ready: verification, per-client summaries, central DP, audit.

    `ledgers` add to those found in the run folder (never replace them: the server's record
    there is what every client ledger is matched against); a file given twice counts once.
    """
    if not run_dir.is_dir():
        raise RunFileError(f"{run_dir}: no such run folder")
    card = _json(run_dir / CARD, dict) or {}
    audit = _json(run_dir / AUDIT, dict)
    if audit is not None and not isinstance(audit.get("runs"), list):
        raise RunFileError(
            f"{run_dir / AUDIT}: no list of audited runs; rerun fedshop privacy audit"
        )
    reports = verify_paths([*find_ledgers(run_dir), *(ledgers or [])], keys)
    _check_server_record(run_dir, reports, card.get("rounds_completed"))
    verdict = Verdict.of(reports)
    return {
        "run_dir": str(run_dir),
        "verified": verdict.ok,
        "keys_pinned": verdict.pinned,
        "verdict": asdict(verdict),
        "keys": str(keys) if keys else None,
        "ledgers": [
            {
                "path": r.path,
                "kind": r.kind,
                "signer": r.signer,
                "ok": r.ok,
                "problem": None if r.ok else r.first_problem(),
                "key": r.key_source,
                "notes": r.notes,
                "findings": [asdict(f) for f in r.findings],
            }
            for r in reports
        ],
        "clients": [client_summary(r) for r in reports if r.kind == "client" and r.spends],
        "central_dp": central_dp(reports),
        "secure_aggregation": secure_rounds(reports),
        "audit": audit,
    }


class RunFileError(ValueError):
    """A run folder's file the report reads besides the ledgers is missing or damaged."""


def _json(path: Path, kind: type) -> object | None:
    """`path`'s JSON (None when the file does not exist), which must be a `kind`."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFileError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise RunFileError(f"{path}: not a JSON {kind.__name__}")
    return value


def _check_server_record(run_dir: Path, reports: list[LedgerReport], completed: object) -> None:
    """A run folder without the server's record, or a record that stops before the rounds the
    run completed (model_card.json), fails: that record is what every client ledger is checked
    against, and cutting the same rounds off every ledger leaves each one consistent."""
    server = next((r for r in reports if r.kind == "server"), None)
    if server is None:
        if reports:  # no ledger at all is its own failure (Verdict.of)
            missing = LedgerReport(str(run_dir / SERVER_LEDGER), "server", "server", "")
            why = "missing: every client ledger is checked against the server's record"
            missing.findings.append(Finding(0, None, why))
            reports.append(missing)
        return
    last = max((rec.server_round for rec in server.records), default=0)
    if isinstance(completed, int) and server.records and last < completed:
        why = (
            f"the record ends at round {last}, but {run_dir / CARD} says the run completed "
            f"round {completed}: records were cut from its end"
        )
        server.findings.append(Finding(len(server.records) + 1, None, why))


def central_dp(reports: list[LedgerReport]) -> dict | None:
    """Client-level DP's figures as the server's signed record last states them (None without
    central DP): never from the unsigned model card."""
    records = [rec for r in reports if r.kind == "server" for rec in r.records]
    return next((rec.central_dp for rec in reversed(records) if rec.central_dp), None)


def write(run_dir: Path, ledgers: list[Path] | None = None, keys: Path | None = None) -> dict:
    """Verify, then write `privacy_report.html` and `privacy_report.json` into the run folder."""
    report = build(run_dir, ledgers, keys)
    write_text(run_dir / PRIVACY_REPORT_HTML, render(report))
    write_json(run_dir / PRIVACY_REPORT_JSON, report)
    return report
