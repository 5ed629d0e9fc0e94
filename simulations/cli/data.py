"""`fedshop data …`: check, convert and generate event logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.atomic import write_text
from common.data.formats import table_stem, write_events, write_quarantine
from common.data.synth import SynthConfig, generate
from simulations.cli.shared import (
    FormatOpt,
    MapOpt,
    OutOpt,
    SpecOpt,
    console,
    events_from,
    fail,
    options_of,
    validated,
)

data_app = typer.Typer(help="Check, convert and generate event logs.", no_args_is_help=True)


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Event log to validate.")],
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: OutOpt = Path("fedshop-data"),
    write: Annotated[
        bool, typer.Option(help="Also write the accepted events as canonical Parquet.")
    ] = False,
) -> None:
    """Validate an event log and summarize it; rejected rows go to a quarantine CSV."""
    result = events_from(path, fmt, spec, maps, history=False).load
    summary = result.summary()
    stem = table_stem(path)
    quarantine = out / f"{stem}.rejected.csv"
    try:
        write_quarantine(result, quarantine)
        summary["quarantine"] = str(quarantine)
        if write:
            events = write_events(result.events, out / f"{stem}.events.parquet")
            summary["events_file"] = str(events)
        write_text(out / f"{stem}.summary.json", json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise fail(f"{out}: cannot write the check's results ({exc})") from exc
    table = Table(title=f"{path} ({result.format})", show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _cell(value))
    console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:,}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@data_app.command("synth")
@options_of(SynthConfig)
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")] = Path(
        "fedshop-data/synthetic.parquet"
    ),
    given: dict | None = None,
) -> None:
    """Generate the synthetic spatio-temporal e-commerce event log (canonical Parquet); the same
    seed gives the same file."""
    frame = generate(validated(SynthConfig, given or {}))
    try:
        write_events(frame, out)
    except OSError as exc:
        raise fail(f"{out}: cannot write ({exc})") from exc
    console.print(f"wrote {len(frame):,} events, {frame['user_id'].nunique():,} users to {out}")
