"""`fedshop`: the command-line front door."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.events import DataError
from common.formats import FORMATS, write_events, write_quarantine
from common.synth import SynthConfig, generate

app = typer.Typer(
    help="fedshop: federated, differentially private training of e-commerce behavior models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Check, convert and generate event logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Event log (CSV, .csv.zip, Parquet). Default: embedded synthetic data."
    ),
]
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", help=f"Source format: {', '.join(FORMATS)}."),
]
SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="Dataset spec (TOML/JSON) mapping your columns.")
]
MapOpt = Annotated[
    list[str] | None,
    typer.Option("--map", help="FIELD=COLUMN for your own format, e.g. --map user_id=customer."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _source(data, fmt, spec, maps, synth=None):
    from simulations.sources import read_source

    try:
        return read_source(data, fmt, spec, maps, synth)
    except DataError as exc:
        raise fail(str(exc)) from exc


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
    src = _source(path, fmt, spec, maps)
    result = src.load
    summary = result.summary()
    stem = path.name.split(".")[0]
    quarantine = out / f"{stem}.rejected.csv"
    write_quarantine(result, quarantine)
    summary["quarantine"] = str(quarantine)
    if write:
        summary["events_file"] = str(write_events(result.events, out / f"{stem}.events.parquet"))
    table = Table(title=f"{path} ({result.format})", show_header=False)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:,}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    (out / f"{stem}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")] = Path(
        "fedshop-data/synthetic.parquet"
    ),
    events: Annotated[int, typer.Option(help="Number of events.")] = 200_000,
    users: Annotated[int, typer.Option(help="Number of users.")] = 5_000,
    items: Annotated[int, typer.Option(help="Catalog size.")] = 2_000,
    regions: Annotated[int, typer.Option(help="Number of regions.")] = 6,
    days: Annotated[int, typer.Option(help="Days covered.")] = 120,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same file.")] = 0,
) -> None:
    """Generate the synthetic spatio-temporal e-commerce event log (canonical Parquet)."""
    try:
        cfg = SynthConfig(
            events=events, users=users, items=items, regions=regions, days=days, seed=seed
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    frame = generate(cfg)
    write_events(frame, out)
    console.print(f"wrote {len(frame):,} events, {frame['user_id'].nunique():,} users to {out}")


def _print_results(
    title: str, rows: list[tuple[str, dict]], forecast: list[tuple[str, dict]]
) -> None:
    table = Table(
        title=f"{title}: next-item, leave-last-out, full ranking (sampled-100 in brackets)"
    )
    for col in ("model", "HR@10", "NDCG@10"):
        table.add_column(col)
    for name, m in rows:
        f, s = m["full"], m["sampled"]
        table.add_row(
            name, f"{f['hr@10']:.4f} ({s['hr@10']:.3f})", f"{f['ndcg@10']:.4f} ({s['ndcg@10']:.3f})"
        )
    console.print(table)
    fc = Table(title="demand per region × top category × week, last 4 weeks held out")
    for col in ("forecast", "WAPE", "MAE"):
        fc.add_column(col)
    for name, m in forecast:
        fc.add_row(name, f"{m['wape']:.3f}", f"{m['mae']:.2f}")
    console.print(fc)


@app.command("train-central")
def train_central_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: OutOpt = Path("runs/central"),
    epochs: Annotated[int, typer.Option(help="Training epochs (best on validation is kept).")] = 3,
    hidden: Annotated[int, typer.Option(help="BERT hidden size.")] = 64,
    layers: Annotated[int, typer.Option(help="BERT layers.")] = 2,
    max_len: Annotated[int, typer.Option(help="Events per user sequence.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Users per batch.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    skip_baselines: Annotated[bool, typer.Option(help="Do not compute the baselines.")] = False,
) -> None:
    """Train the BERT behavior model centrally, without privacy; compare it with the baselines."""
    from common.dataset import prepare
    from common.model import ModelConfig
    from common.training import TrainConfig
    from simulations.central import CentralConfig, baselines, save_run, train_central

    try:
        cfg = CentralConfig(
            model=ModelConfig(hidden=hidden, layers=layers, max_len=max_len),
            train=TrainConfig(
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
            ),
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    src = _source(data, fmt, spec, maps)
    with console.status("preparing sequences"):
        prepared = prepare(src.events, top_category_chars=src.top_category_chars, max_len=max_len)
    base = None if skip_baselines else baselines(prepared)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        epoch_task = progress.add_task("epochs", total=epochs)
        user_task = progress.add_task("users", total=len(prepared.train))

        def on_progress(kind: str, n: float) -> None:
            if kind == "train":
                progress.advance(user_task, n)
            else:
                progress.advance(epoch_task)
                progress.reset(user_task)

        model, results = train_central(prepared, cfg, on_progress)
        progress.remove_task(user_task)
    results = {"source": src.name, "config": cfg.model_dump(), "bert": results, "baselines": base}
    save_run(out, model, prepared, results)
    rows = [("BERT (central, non-private)", results["bert"]["test"])]
    forecast = [(f"BERT {k.replace('_', '-')}", v) for k, v in results["bert"]["forecast"].items()]
    if base:
        rows = [(k.replace("_", " "), v) for k, v in base["recommendation"].items()] + rows
        forecast = [(k.replace("_", " "), v) for k, v in base["forecast"].items()] + forecast
    _print_results(src.name, rows, forecast)
    console.print(f"results in {out}/results.json")


@app.command("baselines")
def baselines_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: OutOpt = Path("runs/baselines"),
) -> None:
    """Popularity and forecasting baselines under the evaluation protocol."""
    from common.dataset import prepare
    from simulations.central import baselines, save_run

    src = _source(data, fmt, spec, maps)
    with console.status("computing baselines"):
        prepared = prepare(src.events, top_category_chars=src.top_category_chars)
        base = baselines(prepared)
    save_run(out, None, prepared, {"source": src.name, "baselines": base})
    _print_results(
        src.name,
        [(k.replace("_", " "), v) for k, v in base["recommendation"].items()],
        [(k.replace("_", " "), v) for k, v in base["forecast"].items()],
    )
