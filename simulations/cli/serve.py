"""`fedshop recommend | forecast | monitor`: using an exported model on recent events."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from safetensors import SafetensorError

from simulations.cli.shared import (
    FormatOpt,
    MapOpt,
    SpecOpt,
    app,
    console,
    err,
    events_from,
    fail,
)

if TYPE_CHECKING:
    from common.learning.inference import Exported

# The commands import the model's stack (torch, transformers) when they run, not to build the CLI.

ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model", help="Run folder with model.safetensors, model_card.json, catalog.json."
    ),
]
EventsOpt = Annotated[
    Path, typer.Option("--events", help="Event log to read users' recent events from.")
]


def _exported(model: Path) -> Exported:
    from common.learning.inference import load_exported

    try:
        return load_exported(model)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    # A cut or garbled model.safetensors, and a model card of the wrong shape (a list, a config
    # that is not a table), escape load_exported's own checks.
    except (SafetensorError, TypeError, AttributeError, MemoryError) as exc:
        raise fail(f"{model}: not a usable exported model ({exc})") from exc


def _events(events: Path, fmt: str, spec: Path | None, maps: list[str] | None) -> pd.DataFrame:
    frame = events_from(events, fmt, spec, maps, history=False).events
    if frame.empty:
        raise fail(f"{events}: no usable events: every row was rejected (see fedshop data check)")
    return frame


@app.command("recommend")
def recommend_cmd(
    model: ModelOpt,
    events: EventsOpt,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="User id(s); default: the first --limit users."),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Items per user.")] = 10,
    limit: Annotated[int, typer.Option(min=1, help="Users shown when no --user is given.")] = 5,
) -> None:
    """Top-k next items (with categories) for users, after their most recent events.

    What a region serves: the shared model beside the region's own transition-aware rule,
    counted on all of --events, with the weights chosen on --events (each user's last event
    held out); the score is the blend's, higher first. The events never leave this machine."""
    from common.learning.inference import recommend

    exp = _exported(model)
    frame = _events(events, fmt, spec, maps)
    if user:
        missing = sorted(set(user) - set(frame["user_id"].astype(str)))
        if missing:
            raise fail(f"{events}: no events for user(s) {', '.join(missing)}")
    chosen = user or frame["user_id"].drop_duplicates().head(limit).tolist()
    with console.status("weighing the model beside the rule on these events"):
        recs = recommend(exp, frame, k, chosen)
    for uid, rows in recs.groupby("user_id", sort=False):
        table = Table(title=f"user {uid}: top {k}")
        for col in ("rank", "item", "category", "score"):
            table.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for r in rows.itertuples():
            table.add_row(str(r.rank), r.item_id, r.category, f"{r.score:.3f}")
        console.print(table)


@app.command("forecast")
def forecast_cmd(
    model: ModelOpt,
    events: EventsOpt,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
) -> None:
    """Next week's demand per region × category, its interval, the robust level and 4-week mean."""
    from common.learning.demand import forecast_next_week
    from common.learning.forecasting import QUANTILES

    exp = _exported(model)
    frame = _events(events, fmt, spec, maps)
    try:
        table_df = forecast_next_week(exp, frame)
    except ValueError as exc:
        raise fail(f"{events}: {exc}") from exc
    _warn_unseen(exp, events, table_df.index)
    week = table_df["week_start"].iloc[0]
    low, high = QUANTILES
    table = Table(
        title=f"units in the week from {week}: forecast = level (trimmed mean of the weeks in "
        "a window chosen by backtest, median under 5 weeks) × the model's ratio, with its "
        f"{low:.0%}–{high:.0%} interval",
        box=box.SIMPLE_HEAD,
    )
    for col in ("region", "category"):
        table.add_column(col, no_wrap=True)
    for col in ("forecast", f"p{low * 100:g}–p{high * 100:g}", "level", "4-week average"):
        table.add_column(col, justify="right", no_wrap=True)
    for (region, top), r in table_df.iterrows():
        table.add_row(
            str(region),
            str(top),
            f"{r['forecast']:.1f}",
            "–" if pd.isna(r["lower"]) else f"{r['lower']:.1f}–{r['upper']:.1f}",
            f"{r['robust_level']:.1f}",
            f"{r['moving_average_4w']:.1f}",
        )
    console.print(table)


def _warn_unseen(exp: Exported, events: Path, index: pd.MultiIndex) -> None:
    from common.learning.demand import unseen

    missing = unseen(exp, index)
    if missing:
        err.print(
            f"[yellow]{escape(str(events))}: {escape(', '.join(missing))} not in the model's "
            "catalog: forecast from their level alone, without the model's correction[/]"
        )


def _units(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


@app.command("monitor")
def monitor_cmd(
    model: ModelOpt,
    events: EventsOpt,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the plots (earlier alert plots there are replaced). "
            "Default: <model run>/monitor.",
        ),
    ] = None,
    weeks: Annotated[int, typer.Option(min=1, help="Last full weeks to check.")] = 4,
) -> None:
    """Region × category weeks that fell outside their forecast interval; a PNG per series.

    Each week is forecast from the data before it, as it would have been at the time.
    """
    from common.learning.monitor import monitor, plot_alerts

    exp = _exported(model)
    frame = _events(events, fmt, spec, maps)
    try:
        result = monitor(exp, frame, weeks)
    except ValueError as exc:
        raise fail(f"{events}: {exc}") from exc
    _warn_unseen(exp, events, result.series.index)
    low, high = result.quantiles
    folder = out or (model if model.is_dir() else model.parent) / "monitor"
    paths = plot_alerts(result, folder)
    if result.alerts.empty:
        console.print(f"no alerts: every series stayed inside its {low:.1%}–{high:.1%} interval")
        return
    table = Table(title=f"{len(result.alerts)} week(s) outside the {low:.1%}–{high:.1%} interval")
    for col in ("region", "category", "week"):
        table.add_column(col, no_wrap=True)
    for col in ("actual", "forecast", "interval", "outside (× bound)"):
        table.add_column(col, justify="right")
    for a in result.alerts.itertuples():
        beyond = a.upper if a.outside > 0 else a.lower
        table.add_row(
            str(a.region),
            str(a.category),
            str(a.week),
            f"{a.actual:.0f}",
            f"{a.forecast:.1f}",
            f"{_units(a.lower)}–{_units(a.upper)}",
            f"{a.outside:+.1f} (×{a.actual / beyond:.2f})" if beyond else f"{a.outside:+.1f}",
        )
    console.print(table)
    console.print(f"{len(paths)} plot(s) in {folder}")
