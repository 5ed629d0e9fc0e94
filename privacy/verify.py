"""Independent verification of privacy ledgers.

For every ledger: the hash chain, the sequence, each signature against a trusted key, and the
arithmetic (each round starts where the last ended, declined rounds spend nothing, nothing passes
the budget), and that the budget, δ and mechanism the first entry fixed never change. Every epsilon
is then recomputed from the recorded mechanism with the accountant the client used (must agree
within 1 %) and with Opacus RDP and PRV and Google's dp-accounting PLD. All three are rigorous
upper bounds (PRV: Opacus' estimate plus its error bound; PLD: dp-accounting's pessimistic
discretisation), so a reported epsilon is certified when it is at least the smallest of them (less
a 0.002 rounding slack); one further below claims less privacy loss than any sound accounting of
the mechanism. Being above RDP's looser bound is never required. The server's aggregation record is
matched against the client ledgers it names: every reply it recorded must cite an entry of the
right status, round and run in a ledger that was given, which is also how a client ledger with its
newest entries cut off is caught.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from opacus.accountants.analysis import rdp as rdp_analysis

from privacy.accounting import replay
from privacy.ledger import (
    Aggregation,
    Chained,
    Finding,
    LedgerError,
    Line,
    Spend,
    UsedEntry,
    check_chain,
    parse,
    read_lines,
)
from privacy.signing import (
    CLIENT_PUBLIC_KEY,
    SERVER_PUBLIC_KEY,
    KeyFileError,
    fingerprint,
    load_keyring,
    load_public,
)

TOLERANCE = 0.01  # relative agreement required between reported and recomputed epsilon
# How far (in ε, absolute) a reported epsilon may sit below the tightest recomputed upper bound.
# PLD's pessimistic figure lies ~1e-4 above PRV's estimate on our mechanisms and PRV's bound 0.01
# above it, so this admits rounding and other library versions, but not PRV's lower bound (0.01
# below its estimate) or any figure further down passed off as epsilon, at every ε.
CERTIFY_SLACK = 2e-3
ACCOUNTANTS = ("rdp", "prv", "pld")
SIBLING_KEYS = {"spend": CLIENT_PUBLIC_KEY, "aggregation": SERVER_PUBLIC_KEY}
PINNED = "pinned"  # a ledger's key source when its signatures were checked with a pinned key
# Fixed by a client's first entry and repeated by every later one: a change would raise the
# budget or alter the mechanism the accounting was planned for.
FIXED_FIELDS = (
    "budget_epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "clip_norm",
    "accountant",
    "steps_per_round",
    "planned_rounds",
    "noisy_users",
)
# Per step of the server's record, the client ledger entry each reply status must cite;
# "refused" cites none (nothing was released, so the client wrote no entry) and is recorded
# with seq -1.
CITES = {
    "train": {"used": "trained", "not-aggregated": "trained", "declined": "declined"},
    "evaluate": {"evaluated": "evaluated"},
}
REFUSED = "refused"
CLIENTS_ALONE = (
    "no server record was given: each client ledger was checked on its own, so entries cut "
    "from its end cannot be detected (give the run's aggregation_ledger.jsonl too)."
)
NOT_PINNED = (
    "signatures were checked with the public keys stored beside the ledgers, which shows that "
    "nothing changed after signing but not who signed; pass --keys with the public keys "
    "registered before training to pin them"
)


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


@functools.lru_cache(maxsize=64)
def _pld_block(sigma: float, q: float, steps: int) -> pld_lib.PrivacyLossDistribution:
    """`steps` releases of one Gaussian mechanism (Poisson-subsampled when q < 1), built as
    dp-accounting's `PLDAccountant` builds them (pessimistic, add/remove one, its default
    discretisation). Cached: every trained entry of a ledger repeats the same round, and
    building its PLD is most of what PLD costs."""
    if q == 1:
        return pld_lib.from_gaussian_mechanism(sigma / math.sqrt(steps))
    return pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q).self_compose(steps)


@contextmanager
def _rdp_memoised() -> Iterator[None]:
    """Memoise Opacus' RDP of one subsampled Gaussian at one order while verifying.

    Opacus' PRV accountant bounds its domain with the RDP of every mechanism in the history at
    every call, and so does the RDP replay; along a ledger that is the same DP-SGD mechanism
    again and again, and it was most of the verification time. The function is pure, so the
    values are the same; the lock keeps concurrent verifications from restoring it out of turn.
    """
    with _RDP_LOCK:
        original = rdp_analysis._compute_rdp
        rdp_analysis._compute_rdp = functools.cache(original)
        try:
            yield
        finally:
            rdp_analysis._compute_rdp = original


_RDP_LOCK = threading.Lock()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _evaluated(epsilon: Callable[[], float]) -> float | None:
    """ε from an accountant, or None (a finding on that entry) when it cannot evaluate the
    recorded mechanism (e.g. a δ of 1e-300 or a noise multiplier of 1e300 written into a
    damaged ledger)."""
    try:
        return _finite(epsilon())
    except (ValueError, ArithmeticError, MemoryError):
        return None


# Gaussian releases whose PLD dp-accounting can build in memory: a crafted ledger's σ of 0.001
# asked for tens of GiB, and 1e300 overflowed. Honest mechanisms sit far inside.
PLD_SIGMA = (0.05, 1e6)
PLD_STEPS = 10**7


def _composed(
    pld: pld_lib.PrivacyLossDistribution | None, sigma: float, q: float, steps: int
) -> pld_lib.PrivacyLossDistribution | None:
    """`pld` composed with `steps` releases of one Gaussian mechanism, or None (PLD cannot
    recompute this entry or any later one) outside PLD_SIGMA and PLD_STEPS."""
    effective = sigma if q < 1 else sigma / math.sqrt(steps)
    if pld is None or not PLD_SIGMA[0] <= effective <= PLD_SIGMA[1] or steps > PLD_STEPS:
        return None
    try:
        return pld.compose(_pld_block(sigma, q, steps))
    except (ValueError, ArithmeticError, MemoryError):
        return None


def _recompute(spends: list[Spend]) -> list[dict[str, float | None]]:
    """Per entry, epsilon after it under each accountant, from the recorded mechanisms only."""
    history: list[tuple[float, float, int]] = []
    pld: pld_lib.PrivacyLossDistribution | None = pld_lib.identity()
    out: list[dict[str, float | None]] = []
    last: dict[str, float | None] = dict.fromkeys(ACCOUNTANTS, 0.0)
    with _rdp_memoised():
        for s in spends:
            if added := s.history():
                history.extend(added)
                for step in added:
                    pld = _composed(pld, *step)
                last = {
                    "rdp": _evaluated(functools.partial(replay, history, s.delta, "rdp")),
                    "prv": _evaluated(functools.partial(replay, history, s.delta, "prv")),
                    "pld": pld
                    and _evaluated(functools.partial(pld.get_epsilon_for_delta, s.delta)),
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


def _fixed(lines: list[Line], spends: list[Spend]) -> list[Finding]:
    """The first entry's budget, δ and mechanism hold along the ledger; each kind of Gaussian
    release keeps one noise multiplier and sensitivity; the user count is released exactly
    once, with the first trained round (it sets the sample rate and leaves with that update),
    and the item-popularity histogram at most once, with that same round."""
    findings = []
    first = spends[0]
    trained = next((i for i, s in enumerate(spends) if s.status == "trained"), None)
    kinds: dict[str, tuple[float, float, int]] = {}  # release kind -> (σ, sensitivity, line)
    for index, (line, s) in enumerate(zip(lines, spends, strict=True)):
        for name in FIXED_FIELDS:
            value, fixed = getattr(s, name), getattr(first, name)
            if value != fixed:
                findings.append(
                    Finding(
                        line.number,
                        s.seq,
                        f"{name} changed to {value!r} from {fixed!r}, which the first entry "
                        f"(line {lines[0].number}) fixed: budget, δ and mechanism never change",
                    )
                )
        for r in s.releases:
            sigma, sensitivity, where = kinds.setdefault(
                r.what, (r.noise_multiplier, r.sensitivity, line.number)
            )
            if (r.noise_multiplier, r.sensitivity) != (sigma, sensitivity):
                findings.append(
                    Finding(
                        line.number,
                        s.seq,
                        f"{r.what} release with noise multiplier {r.noise_multiplier:g} and "
                        f"sensitivity {r.sensitivity:g}; line {where} released it with "
                        f"{sigma:g} and {sensitivity:g}: one kind of release keeps one mechanism",
                    )
                )
        counts = sum(r.what == "user-count" for r in s.releases)
        if counts and index != trained:
            findings.append(
                Finding(
                    line.number,
                    s.seq,
                    "a user-count release outside the first trained entry"
                    + ("" if trained is None else f" (line {lines[trained].number})")
                    + ": the count is released once, with the first training round",
                )
            )
        elif counts > 1:
            findings.append(
                Finding(line.number, s.seq, f"the user count is released {counts} times")
            )
        elif sum(r.what == "item-popularity" for r in s.releases) > (index == trained):
            findings.append(
                Finding(
                    line.number,
                    s.seq,
                    "an item-popularity release outside the first trained entry, or twice: "
                    "the histogram is released at most once, with the first training round",
                )
            )
        elif index == trained and not counts:
            findings.append(
                Finding(
                    line.number,
                    s.seq,
                    f"the first trained entry releases no user count, yet its sample rate "
                    f"derives from one ({s.noisy_users} users): that release is unaccounted",
                )
            )
    return findings


def _arithmetic(lines: list[Line], spends: list[Spend]) -> tuple[list[EntryCheck], list[Finding]]:
    checks, findings = [], _fixed(lines, spends)
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
        return key, PINNED if key else f"no trusted key named {signer!r}"
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


def _cited(
    used: UsedEntry, record: Aggregation, line_no: int, ledger: LedgerReport
) -> tuple[LedgerReport | None, int, str] | None:
    """What is wrong with the client entry a reply in the server's record (at `line_no`)
    cites, if anything: the client ledger to blame and its line — or None, the record's line —
    and the reason. Called for replies that must cite an entry."""
    where = f"entry {used.seq} that the server's round {record.server_round} used"
    if used.seq >= len(ledger.hashes):
        return (
            ledger,
            len(ledger.hashes) + 1,
            f"{where} is missing: the ledger was cut short or entries were removed",
        )
    if ledger.hashes[used.seq] != used.hash:
        return (
            ledger,
            used.seq + 1,
            f"{where} differs from what the server received (server record line {line_no})",
        )
    if not ledger.spends:  # unreadable entries: their findings are already on the ledger
        return None
    spend = ledger.spends[used.seq]
    cited = (
        f"round {record.server_round}: {used.client}'s {used.status!r} reply cites "
        f"{ledger.path}, line {used.seq + 1}"
    )
    expected = CITES[record.step][used.status]
    if spend.status != expected:
        return None, 0, f"{cited}, a {spend.status!r} entry, not a {expected!r} one"
    if spend.server_round != record.server_round:
        return None, 0, f"{cited}, an entry of round {spend.server_round}, not this round"
    if spend.run_id != record.run_id:
        return None, 0, f"{cited}, an entry of run {spend.run_id!r}, not {record.run_id!r}"
    return None


def _check_record(
    record: Aggregation,
    line_no: int,
    clients: dict[str, LedgerReport],
    missing: set[str],
) -> list[Finding]:
    """Findings on the server record's line `line_no` (client ledgers get their own); a client
    whose ledger is missing is reported once, at its first reply (`missing` remembers it)."""
    findings = []
    for used in record.clients:
        who = f"round {record.server_round}: {used.client}'s {used.status!r} reply"
        problem = None
        if used.status == REFUSED:
            if used.seq >= 0:
                problem = f"{who} cites ledger entry {used.seq}; a refusal writes none"
        elif used.status not in CITES[record.step]:
            problem = f"{who}: not a status of a {record.step!r} record"
        elif used.seq < 0:
            problem = (
                f"{who} cites no ledger entry: a release the client did not record is not "
                "covered by its privacy accounting"
            )
        elif used.client not in clients:
            if used.client not in missing:
                missing.add(used.client)
                problem = (
                    f"{who}: no readable ledger of {used.client!r} was given, so what it spent "
                    "cannot be checked"
                )
        elif cited := _cited(used, record, line_no, clients[used.client]):
            blame, line, reason = cited
            if blame is None:
                problem = reason
            else:
                blame.findings.append(Finding(line, used.seq, reason))
        if problem:
            findings.append(Finding(line_no, record.seq, problem))
    return findings


def cross_check(reports: list[LedgerReport]) -> None:
    """Match the server's record against the client ledgers it names.

    Every reply must cite an entry of the client's ledger, which must be given: a training
    update must cite a trained entry, a decline a declined one, an evaluation an evaluated one,
    each of the record's round and run, with the hash the server received. Only a refusal
    (nothing released) cites none.
    """
    clients: dict[str, LedgerReport] = {}
    for r in (r for r in reports if r.kind == "client"):
        if r.signer in clients:  # which one the server's record is checked against is moot
            first = clients[r.signer].path
            why = f"a second ledger of client {r.signer!r} (the first: {first})"
            why += ": one client keeps one ledger"
            r.findings.append(Finding(0, None, why))
        else:
            clients[r.signer] = r
    for server in (r for r in reports if r.kind == "server"):
        missing: set[str] = set()
        for line_no, record in enumerate(server.records, start=1):
            server.findings.extend(_check_record(record, line_no, clients, missing))


def unique(paths: list[Path]) -> list[Path]:
    """`paths` in order, each file once (by resolved path): a ledger given twice is one ledger."""
    seen: dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


def verify_paths(paths: list[Path], keys: Path | None = None) -> list[LedgerReport]:
    keyring = load_keyring(keys) if keys is not None else None
    reports = [verify_ledger(p, keyring) for p in unique(paths)]
    cross_check(reports)
    return reports


@dataclass(frozen=True)
class Verdict:
    ok: bool
    pinned: bool  # every signature was checked with a key from the trusted folder (--keys)
    headline: str
    problem: str | None  # the first failure, or why the result is weaker than pinned

    @classmethod
    def of(cls, reports: list[LedgerReport]) -> Verdict:
        """The one-line result: zero ledgers is a failure, never "all verified"; a pass says
        whether the keys were pinned or only read from beside the ledgers."""
        if not reports:
            return cls(False, False, "verification FAILED", "no ledgers were given or found")
        pinned = all(r.key_source == PINNED for r in reports)
        bad = [r for r in reports if not r.ok]
        if bad:
            return cls(False, pinned, "verification FAILED", bad[0].first_problem())
        n = f"all {len(reports)} ledger{'s' if len(reports) > 1 else ''}"
        alone = not any(r.kind == "server" for r in reports)
        without = ", without the server's record" if alone else ""
        notes = ([] if pinned else [NOT_PINNED]) + ([CLIENTS_ALONE] if alone else [])
        claim = (
            "verified against pinned keys" if pinned else "internally consistent, keys not pinned"
        )
        return cls(True, pinned, f"{n} {claim}{without}", " ".join(notes) or None)
