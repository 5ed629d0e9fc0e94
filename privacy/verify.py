"""Independent verification of privacy ledgers.

For every ledger: the hash chain, the sequence, each signature against a trusted key, and the
arithmetic (each round starts where the last ended, declined rounds spend nothing, nothing passes
the budget). Every epsilon is then recomputed from the recorded mechanism with the accountant the
client used (must agree within 1 %) and with Opacus RDP and PRV and Google's dp-accounting PLD.
All three are rigorous upper bounds (PRV: Opacus' estimate plus its error bound; PLD:
dp-accounting's pessimistic discretisation), so a reported epsilon is certified when it is at
least the smallest of them (less a 0.002 rounding slack); one further below claims less privacy
loss than any sound accounting of the mechanism. Being above RDP's looser bound is never
required. The server's aggregation record is matched against the client ledgers it names, which
is how a client ledger with its newest entries cut off is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import dp_accounting
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting.pld import pld_privacy_accountant

from privacy.accounting import replay
from privacy.ledger import (
    Aggregation,
    Chained,
    Finding,
    LedgerError,
    Line,
    Spend,
    check_chain,
    parse,
    read_lines,
)
from privacy.signing import KeyFileError, fingerprint, load_keyring, load_public

TOLERANCE = 0.01  # relative agreement required between reported and recomputed epsilon
# How far (in ε, absolute) a reported epsilon may sit below the tightest recomputed upper bound.
# PLD's pessimistic figure lies ~1e-4 above PRV's estimate on our mechanisms and PRV's bound 0.01
# above it, so this admits rounding and other library versions, but not PRV's lower bound (0.01
# below its estimate) or any figure further down passed off as epsilon, at every ε.
CERTIFY_SLACK = 2e-3
ACCOUNTANTS = ("rdp", "prv", "pld")
SIBLING_KEYS = {"spend": "signing.pub", "aggregation": "keys/server.pub"}


@dataclass
class EntryCheck:
    seq: int
    server_round: int
    status: str
    reported: float
    recomputed: dict[str, float | None] = field(default_factory=dict)


@dataclass
class LedgerReport:
    path: str
    kind: str  # "client" or "server"
    signer: str
    key_source: str
    entries: list[EntryCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    spends: list[Spend] = field(default_factory=list, repr=False)
    records: list[Aggregation] = field(default_factory=list, repr=False)
    hashes: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.findings

    def first_problem(self) -> str:
        f = min(self.findings, key=lambda x: x.line)
        where = f", line {f.line}" if f.line else ""
        seq = "" if f.seq is None else f" (entry {f.seq})"
        return f"{self.path}{where}{seq}: {f.problem}"


class _Pld:
    """dp-accounting's PLD accountant, composed one round at a time."""

    def __init__(self) -> None:
        self.accountant = pld_privacy_accountant.PLDAccountant()

    def compose(self, history: list[tuple[float, float, int]], delta: float) -> float:
        for sigma, q, steps in history:
            gaussian = dp_accounting.GaussianDpEvent(sigma)
            event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
            self.accountant.compose(event, steps)
        return float(self.accountant.get_epsilon(delta))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _recompute(spends: list[Spend]) -> list[dict[str, float | None]]:
    """Per entry, epsilon after it under each accountant, from the recorded mechanisms only."""
    history: list[tuple[float, float, int]] = []
    pld = _Pld()
    out: list[dict[str, float | None]] = []
    last: dict[str, float | None] = dict.fromkeys(ACCOUNTANTS, 0.0)
    for s in spends:
        if added := s.history():
            history.extend(added)
            last = {
                "rdp": _finite(replay(history, s.delta, "rdp")),
                "prv": _finite(replay(history, s.delta, "prv")),
                "pld": _finite(pld.compose(added, s.delta)),
            }
        out.append(dict(last))
    return out


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _problems(s: Spend, first: Spend, before: float, eps: dict[str, float | None]) -> list[str]:
    problems = []
    if s.client != first.client:
        problems.append(f"client {s.client!r} in {first.client!r}'s ledger")
    if not _close(s.epsilon_before, before, 1e-9):
        problems.append(
            f"epsilon_before {s.epsilon_before:.6g} is not the previous epsilon_after {before:.6g}"
        )
    if s.status == "declined" and (s.history() or s.epsilon_after != s.epsilon_before):
        problems.append("a declined round spent privacy")
    if s.status == "trained" and not s.steps:
        problems.append("a trained round with no steps")
    if s.status == "evaluated" and (s.steps or [r.what for r in s.releases] != ["evaluation"]):
        problems.append("an evaluation entry must hold one evaluation release and no steps")
    own = eps.get(s.accountant)
    if own is None:
        problems.append(f"accountant {s.accountant!r} cannot recompute this entry")
    elif not _close(own, s.epsilon_after, TOLERANCE):
        problems.append(
            f"miscomputed: epsilon_after {s.epsilon_after:.6g}, but {s.accountant} gives "
            f"{own:.6g} for the recorded mechanism"
        )
    bounds = {k: v for k, v in eps.items() if v is not None}
    if bounds and s.epsilon_after < min(bounds.values()) - CERTIFY_SLACK:
        figures = ", ".join(f"{k} {v:.6g}" for k, v in bounds.items())
        problems.append(
            f"under-reported: epsilon_after {s.epsilon_after:.6g} is below every upper bound "
            f"recomputed for the recorded mechanism ({figures})"
        )
    if s.epsilon_after > s.budget_epsilon * (1 + 1e-9):
        problems.append(f"over budget: {s.epsilon_after:.6g} > {s.budget_epsilon:.6g}")
    return problems


def _arithmetic(lines: list[Line], spends: list[Spend]) -> tuple[list[EntryCheck], list[Finding]]:
    checks, findings = [], []
    before = 0.0
    for line, s, eps in zip(lines, spends, _recompute(spends), strict=True):
        checks.append(EntryCheck(s.seq, s.server_round, s.status, s.epsilon_after, eps))
        findings += [Finding(line.number, s.seq, p) for p in _problems(s, spends[0], before, eps)]
        before = s.epsilon_after
    return checks, findings


def _trusted(
    path: Path, kind: str, signer: str, keyring: dict[str, Ed25519PublicKey] | None
) -> tuple[Ed25519PublicKey | None, str]:
    if keyring is not None:
        key = keyring.get(signer)
        return key, "pinned" if key else f"no trusted key named {signer!r}"
    sibling = path.parent / SIBLING_KEYS[kind]
    try:
        return load_public(sibling), f"{sibling} (not pinned: pass --keys to pin trusted keys)"
    except KeyFileError:
        return None, f"no public key at {sibling}; pass --keys"


def verify_ledger(path: Path, keyring: dict[str, Ed25519PublicKey] | None) -> LedgerReport:
    """Check one ledger (client or server); problems are findings, never exceptions."""
    try:
        lines = read_lines(path)
        if not lines:
            raise LedgerError(f"{path}: the ledger is empty")
        kind = str(lines[0].body.get("kind"))
        model: type[Chained] = {"spend": Spend, "aggregation": Aggregation}.get(kind)
        if model is None:
            raise LedgerError(f"{path}, line 1: unknown entry kind {kind!r}", 1)
        typed = [parse(path, line, model) for line in lines]
    except LedgerError as exc:
        report = LedgerReport(str(path), "unknown", "", "")
        problem = str(exc).removeprefix(f"{path}, line {exc.line}: ").removeprefix(f"{path}: ")
        report.findings.append(Finding(exc.line, None, problem))
        return report
    signer = typed[0].client if kind == "spend" else "server"
    public, source = _trusted(path, kind, signer, keyring)
    report = LedgerReport(str(path), "client" if kind == "spend" else "server", signer, source)
    report.hashes = [line.hash for line in lines]

    def key_for(line: Line) -> Ed25519PublicKey | None:
        if public is None or line.body.get("key") != fingerprint(public):
            return None
        return public

    report.findings.extend(check_chain(lines, key_for))
    if kind == "spend":
        report.spends = typed
        report.entries, findings = _arithmetic(lines, typed)
        report.findings.extend(findings)
    else:
        report.records = typed
    return report


def cross_check(reports: list[LedgerReport]) -> None:
    """Every client entry the server's record names must be in that client's ledger."""
    clients = {r.signer: r for r in reports if r.kind == "client"}
    for server in (r for r in reports if r.kind == "server"):
        for line_no, record in enumerate(server.records, start=1):
            for used in record.clients:
                if used.seq < 0:
                    continue
                ledger = clients.get(used.client)
                if ledger is None:
                    note = f"{used.client}: ledger not given, its round entries are unchecked"
                    if note not in server.notes:
                        server.notes.append(note)
                    continue
                where = f"entry {used.seq} that the server's round {record.server_round} used"
                if used.seq >= len(ledger.hashes):
                    ledger.findings.append(
                        Finding(
                            len(ledger.hashes) + 1,
                            used.seq,
                            f"{where} is missing: the ledger was cut short or entries were removed",
                        )
                    )
                elif ledger.hashes[used.seq] != used.hash:
                    ledger.findings.append(
                        Finding(
                            used.seq + 1,
                            used.seq,
                            f"{where} differs from what the server "
                            f"received (server record line {line_no})",
                        )
                    )


def verify_paths(paths: list[Path], keys: Path | None = None) -> list[LedgerReport]:
    keyring = load_keyring(keys) if keys is not None else None
    reports = [verify_ledger(p, keyring) for p in paths]
    cross_check(reports)
    return reports
