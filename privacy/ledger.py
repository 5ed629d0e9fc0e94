"""Append-only, hash-chained, Ed25519-signed ledgers (JSON lines).

Each line holds one entry: its body (with `seq`, the SHA-256 `prev` of the entry before and the
signer's key fingerprint), the body's hash and the signer's signature over the canonical body.
Altering, removing or reordering an entry breaks the hash chain or a signature; removing the
newest entries is caught against the server's aggregation record, which names the client entries
each round used. Every append rewrites the file through a temporary file and a rename, so a crash
leaves the old ledger or the new one, never half a line.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import write_with
from privacy.signing import fingerprint, verifies

GENESIS = "0" * 64


class Chained(BaseModel):
    """Fields every entry carries so that it can be chained and attributed."""

    model_config = ConfigDict(extra="forbid")
    seq: int = Field(ge=0)
    prev: str
    key: str
    time: str
    run_id: str
    server_round: int = Field(ge=1)


class Release(BaseModel):
    """A Gaussian release beside DP-SGD: noise of `noise_multiplier × sensitivity` on values
    that one user (added or removed) moves by at most `sensitivity` in L2 norm. Composed as
    Opacus' history step (noise_multiplier, sample rate 1, 1 step): an unsampled Gaussian."""

    model_config = ConfigDict(extra="forbid")
    what: Literal["user-count", "item-popularity", "evaluation"]
    noise_multiplier: float = Field(gt=0)
    sensitivity: float = Field(gt=0)


class Spend(Chained):
    """One client release — a training round (DP-SGD, plus the user count at the first one), an
    evaluation, or a declined round — and its cost, user-level (add/remove one user).

    The budget, δ, accountant and DP-SGD mechanism are fixed by the first entry; every later
    entry repeats them unchanged, so a reader can check that nobody raised them.
    """

    kind: Literal["spend"] = "spend"
    client: str
    status: Literal["trained", "evaluated", "declined"]
    noise_multiplier: float = Field(gt=0)
    clip_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    accountant: str
    epsilon_before: float = Field(ge=0)
    epsilon_after: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    budget_epsilon: float = Field(gt=0)
    steps_per_round: int = Field(ge=1)
    planned_rounds: int = Field(ge=1)
    noisy_users: int = Field(ge=1)  # the released user count: sets q and the FedAvg weight
    releases: list[Release] = Field(default_factory=list)

    def history(self) -> list[tuple[float, float, int]]:
        """This entry's releases in Opacus' history form (noise multiplier, sample rate, steps)."""
        sgd = [(self.noise_multiplier, self.sample_rate, self.steps)] if self.steps else []
        return sgd + [(r.noise_multiplier, 1.0, 1) for r in self.releases]


class UsedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client: str
    status: str
    seq: int
    hash: str


class Aggregation(Chained):
    """The server's record of a round's step: which client ledger entries it received and
    used. Evaluations are recorded too: their spends then join the heads a client must still
    hold, so a restored ledger cannot forget them."""

    kind: Literal["aggregation"] = "aggregation"
    step: Literal["train", "evaluate"] = "train"  # older records, written before "evaluate"
    strategy: str
    clients: list[UsedEntry]
    central_dp: dict[str, float | str] | None = None
    # SecAgg+'s settings and the nodes that dropped out, when the round ran under it
    secure_aggregation: dict[str, Any] | None = None


class LedgerError(ValueError):
    """A ledger cannot be read: names the file and the line (0 = the file as a whole)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line in the file
    body: dict
    hash: str
    signature: bytes


def canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(body: dict) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def read_lines(path: Path) -> list[Line]:
    """Parse a ledger file; a truncated or corrupt line is an error naming it, never a crash."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read the ledger ({exc})") from exc
    if text and not text.endswith("\n"):
        count = text.count("\n") + 1
        raise LedgerError(
            f"{path}, line {count}: truncated (no line end); the file is incomplete", count
        )
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            obj = json.loads(raw, parse_constant=_no_constant)
            line = Line(
                number, dict(obj["entry"]), str(obj["hash"]), base64.b64decode(obj["signature"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{path}, line {number}: not a ledger entry ({exc})", number) from exc
        lines.append(line)
    return lines


def _no_constant(name: str) -> None:
    # Entries are written without NaN/Infinity (they have no canonical form to hash); one read
    # back would pass the parser and fail only at hashing, outside every error report.
    raise ValueError(f"{name} is not valid JSON")


def parse(path: Path, line: Line, model: type[Chained]) -> Chained:
    try:
        return model.model_validate(line.body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = f"{path}, line {line.number}: field '{field}': {first['msg']}"
        raise LedgerError(message, line.number) from exc


def entries(path: Path, model: type[Chained]) -> list[Chained]:
    """The typed entries of a ledger, or [] when it does not exist yet."""
    if not path.exists():
        return []
    return [parse(path, line, model) for line in read_lines(path)]


def read_signed(path: Path, public: Ed25519PublicKey) -> list[Line]:
    """The lines of a ledger that `public`'s owner wrote, each checked (hash, sequence, chain,
    signature) before anyone spends from it.

    A signer reads back only what it signed: an edited entry (fewer steps, say) would
    otherwise lower the privacy it believes it has spent. A ledger exists from its first
    append on, so an empty file was cut, not started."""
    lines = read_lines(path)
    if not lines:
        raise LedgerError(f"{path}: the ledger is empty; it held at least one entry once")

    def key_for(line: Line) -> Ed25519PublicKey | None:
        return public if line.body.get("key") == fingerprint(public) else None

    for finding in check_chain(lines, key_for):
        raise LedgerError(
            f"{path}, line {finding.line}: {finding.problem}; nothing is spent from a ledger "
            "its own signer cannot vouch for",
            finding.line,
        )
    return lines


def check_head(path: Path, lines: list[Line], head: tuple[int, str] | None) -> None:
    """Refuse a ledger that lacks an entry the server recorded from this client.

    A restored backup, a deleted state folder or a rolled-back file would otherwise restart the
    client's accounting below what it has really spent.
    """
    if head is None:
        return
    seq, expected = head
    if len(lines) <= seq or lines[seq].hash != expected:
        found = "is missing" if len(lines) <= seq else "differs"
        raise LedgerError(
            f"{path}: the server recorded entry {seq} ({expected[:12]}…) from this client, but "
            f"here it {found} ({len(lines)} entries); restore the ledger before training again, "
            "or the spent privacy would be forgotten"
        )


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the ledger at `path` (a `.lock` file beside it) until the
    block ends, across processes: a client reads its ledger, decides, trains and appends under
    one lock, so two runs on one client can neither lose nor double-spend a round."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append(path: Path, fields: dict, key: Ed25519PrivateKey, model: type[Chained]) -> Line:
    """Chain, sign and durably append one entry; returns it as written."""
    lines = read_lines(path) if path.exists() else []
    body = {
        **fields,
        "seq": len(lines),
        "prev": lines[-1].hash if lines else GENESIS,
        "key": fingerprint(key.public_key()),
        "time": now(),
    }
    body = model.model_validate(body).model_dump(mode="json")
    data = canonical(body)
    line = Line(len(lines) + 1, body, hashlib.sha256(data).hexdigest(), key.sign(data))
    record = {
        "entry": body,
        "hash": line.hash,
        "signature": base64.b64encode(line.signature).decode(),
    }
    old = path.read_bytes() if path.exists() else b""
    new = json.dumps(record, sort_keys=True, allow_nan=False).encode() + b"\n"
    write_with(path, lambda tmp: tmp.write_bytes(old + new))
    return line


@dataclass(frozen=True)
class Finding:
    line: int
    seq: int | None
    problem: str


def check_chain(
    lines: list[Line], key_for: Callable[[Line], Ed25519PublicKey | None]
) -> list[Finding]:
    """Hashes, sequence, chain links and signatures, in file order."""
    findings = []
    prev = GENESIS
    for index, line in enumerate(lines):
        seq = line.body.get("seq")
        if digest(line.body) != line.hash:
            findings.append(Finding(line.number, seq, "entry altered: its hash does not match"))
        if seq != index:
            findings.append(
                Finding(
                    line.number,
                    seq,
                    f"out of order or missing entries: seq {seq}, expected {index}",
                )
            )
        if line.body.get("prev") != prev:
            findings.append(
                Finding(
                    line.number,
                    seq,
                    "chain broken: 'prev' is not the hash of the entry "
                    "before (an entry was removed, inserted or reordered)",
                )
            )
        public = key_for(line)
        if public is None:
            findings.append(Finding(line.number, seq, "signed by a key that is not trusted"))
        elif not verifies(public, line.signature, canonical(line.body)):
            findings.append(Finding(line.number, seq, "bad signature"))
        prev = line.hash
    return findings
