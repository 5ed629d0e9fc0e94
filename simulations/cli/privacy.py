"""`fedshop keys` and `fedshop privacy …`: signing keys, ledger verification, the compliance
report and the membership-inference audit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from common.run_files import PRIVACY_REPORT_HTML
from privacy.signing import KeyFileError, create_pair, fingerprint
from simulations.cli.shared import app, console, err, fail

if TYPE_CHECKING:
    from privacy.verify import Verdict

# Verification, the report and the audit import their accountants and models when they run, not
# to build the CLI.

privacy_app = typer.Typer(
    help="Verify privacy ledgers, write the compliance report, audit a trained model.",
    no_args_is_help=True,
)
KeysOpt = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="Folder of trusted public keys, NAME.pub for each client and server.pub. "
        "Without it, signatures are checked against the key files next to each ledger "
        "(which proves integrity, not who signed).",
    ),
]


@app.command("keys")
def keys(
    names: Annotated[
        list[str], typer.Argument(help="Whom to make keys for: client names, server.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for NAME.key / NAME.pub.")
    ] = Path("keys"),
    force: Annotated[
        bool, typer.Option(help="Replace existing keys (old ledgers stop verifying).")
    ] = False,
) -> None:
    """Create Ed25519 key pairs that sign privacy ledgers.

    Give each client its NAME.key (SuperNode: --node-config "signing-key='…/NAME.key'"), keep
    server.key with the ServerApp (run config server-key), and hand every .pub to compliance.
    """
    table = Table("name", "private key (keep secret)", "public key", "fingerprint")
    for name in names:
        try:
            key = create_pair(out / f"{name}.key", overwrite=force)
        except KeyFileError as exc:
            raise fail(str(exc)) from exc
        table.add_row(
            name, str(out / f"{name}.key"), str(out / f"{name}.pub"), fingerprint(key.public_key())
        )
    console.print(table)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


@privacy_app.command("verify")
def verify(
    ledgers: Annotated[
        list[Path],
        typer.Argument(
            help="Ledger files: clients' privacy_ledger.jsonl and the "
            "server's aggregation_ledger.jsonl (with it, every client it names)."
        ),
    ],
    keys: KeysOpt = None,
) -> None:
    """Check chains, signatures and arithmetic; recompute every ε with RDP, PRV and PLD.

    Exits 1 naming the first bad entry when anything was altered, removed, reordered,
    miscomputed, changed mid-ledger or missing (a client the server's record names without its
    ledger), 0 when every ledger holds; the last line says whether the keys were pinned.
    """
    from privacy.verify import Verdict, verify_paths

    try:
        reports = verify_paths(ledgers, keys)
    except KeyFileError as exc:
        raise fail(str(exc)) from exc
    except ValueError as exc:
        _say(_unverifiable(ledgers, exc))
    for r in reports:
        if r.kind == "client":
            table = Table(
                "entry",
                "round",
                "status",
                "reported ε",
                "RDP",
                "PRV",
                "PLD",
                title=escape(f"{r.signer}: {r.path}"),
            )
            for e in r.entries:
                table.add_row(
                    str(e.seq),
                    str(e.server_round),
                    escape(e.status),
                    _fmt(e.reported),
                    *(_fmt(e.recomputed.get(k)) for k in ("rdp", "prv", "pld")),
                )
            console.print(table)
        # Names, paths and reasons come from the ledgers: printed as text, never as markup.
        verdict = (
            "[green]verified[/]" if r.ok else f"[bold red]FAILED[/] {escape(r.first_problem())}"
        )
        console.print(f"{escape(f'{r.path} ({r.kind}, key: {r.key_source})')}: {verdict}")
        for note in r.notes:
            console.print(f"  note: {escape(note)}")
    _say(Verdict.of(reports))


def _unverifiable(ledgers: list[Path], exc: ValueError) -> Verdict:
    """An altered entry can record a mechanism no accountant evaluates (say δ = 1e-300): the
    ledgers then fail verification, with the reason, like any other alteration."""
    from privacy.verify import Verdict

    where = ", ".join(map(str, ledgers)) or "the run's ledgers"
    problem = f"{where}: cannot recompute ε from the recorded mechanisms ({exc})"
    return Verdict(False, False, "verification FAILED", problem)


def _say(verdict: Verdict) -> None:
    """The headline; exit 1 unless everything verified."""
    if verdict.ok:
        console.print(f"[green]{escape(verdict.headline)}[/]" + ("" if verdict.pinned else ":"))
        if verdict.problem:
            console.print(f"  {escape(verdict.problem)}")
        return
    err.print(f"[bold red]{escape(verdict.headline)}:[/] {escape(str(verdict.problem))}")
    raise typer.Exit(1)


@privacy_app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's output folder.")],
    ledger: Annotated[
        list[Path] | None,
        typer.Option(
            "--ledger",
            help="More ledger files, checked with those found in RUN_DIR "
            "(deployment: collected from the clients); a file given twice counts once.",
        ),
    ] = None,
    keys: KeysOpt = None,
) -> None:
    """Write privacy_report.html (self-contained) and privacy_report.json into RUN_DIR."""
    from privacy import report as privacy_report
    from privacy.verify import Verdict

    try:
        result = privacy_report.write(run_dir, ledger, keys)
    except (KeyFileError, privacy_report.RunFileError) as exc:
        raise fail(str(exc)) from exc
    except ValueError as exc:
        _say(_unverifiable([run_dir, *(ledger or [])], exc))
    console.print(f"report: {escape(str(run_dir / PRIVACY_REPORT_HTML))}")
    _say(Verdict(**result["verdict"]))


@privacy_app.command("audit")
def audit(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders to attack side by side, e.g. a DP run and a "
            "non-private one, both trained with --audit-holdout."
        ),
    ],
    references: Annotated[
        int,
        typer.Option(
            min=2,
            help="Reference models for LiRA (even: pairs on complementary halves of the "
            "users); more = a stronger, slower attack.",
        ),
    ] = 2,
) -> None:
    """Membership-inference audit: loss-threshold and offline LiRA attacks on each run's model.

    Members are users of the clients whose updates the server used; non-members the users those
    clients held out. Reports AUC and TPR at low FPR per attack, with the ε from the clients'
    ledgers. Evidence, not a proof. Writes audit.json into every run folder; `privacy report`
    shows it.
    """
    from privacy.audit import COLUMNS
    from privacy.audit import audit as run_audit

    try:
        with console.status(f"training {references} reference models, attacking each run"):
            result = run_audit(runs, references)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    table = Table(*COLUMNS, title="membership inference")
    for r in result["runs"]:
        for name, roc in r["attacks"].items():
            table.add_row(
                r["run"],
                str(r["epsilon"]),
                name,
                f"{roc['auc']:.3f}",
                f"{roc['tpr_at_fpr']['0.01']:.3f}",
                f"{roc['tpr_at_fpr']['0.001']:.3f}",
                f"{r['members']:,} / {r['non_members']:,}",
            )
    console.print(table)
    console.print(
        "AUC 0.5 = the attack cannot tell members from non-members. Evidence, not a "
        "proof: the guarantee is the ledger's ε."
    )
