"""`fedshop`: the command-line front door."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.data.events import DataError
from common.data.formats import FORMATS, write_events, write_quarantine
from common.data.synth import SynthConfig, generate
from common.runconfig import RunConfig
from simulations.privacy_cli import keys, privacy_app

app = typer.Typer(
    help="fedshop: federated, differentially private training of e-commerce behavior models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Check, convert and generate event logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(privacy_app, name="privacy")
app.command("keys")(keys)
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


RUN = {name: f.default for name, f in RunConfig.model_fields.items()}  # simulate's defaults


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _source(data, fmt, spec, maps, synth=None):
    from common.data.sources import read_source

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


def _label(name: str, m: dict) -> str:
    """A baseline's name, with what was chosen on held-in data (weights, a level's window)."""
    if "weights" in m:
        return f"{name} ({', '.join(f'{k} {v:g}' for k, v in m['weights'].items())})"
    if "window" in m:
        return f"{name} ({m['window'] or 'all'} weeks)"
    return name


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
            _label(name, m),
            f"{f['hr@10']:.4f} ({s['hr@10']:.3f})",
            f"{f['ndcg@10']:.4f} ({s['ndcg@10']:.3f})",
        )
    console.print(table)
    fc = Table(title="demand per region × top category × week, last 4 weeks held out")
    for col in ("forecast", "WAPE", "MAE", "interval coverage"):
        fc.add_column(col)
    for name, m in forecast:
        name = _label(name, m)
        cover = ""
        if "coverage" in m:
            low, high = m["interval"]
            cover = (
                "history too short"
                if math.isnan(m["coverage"])
                else f"{m['coverage']:.1%} in the {low:.0%}–{high:.0%} interval"
            )
        fc.add_row(name, f"{m['wape']:.3f}", f"{m['mae']:.2f}", cover)
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
    max_len: Annotated[int, typer.Option(help="Events the encoder attends over at once.")] = 50,
    windows: Annotated[
        int, typer.Option(help="Windows of max-len events read (and trained on) per user.")
    ] = RUN["windows"],
    batch_size: Annotated[int, typer.Option(help="Users per batch.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    skip_baselines: Annotated[bool, typer.Option(help="Do not compute the baselines.")] = False,
) -> None:
    """Train the BERT behavior model centrally, without privacy; compare it with the baselines."""
    from common.learning.dataset import prepare
    from common.learning.model import ModelConfig
    from common.learning.training import TrainConfig
    from simulations.central import CentralConfig, baselines, save_run, train_central

    try:
        cfg = CentralConfig(
            model=ModelConfig(hidden=hidden, layers=layers, max_len=max_len, windows=windows),
            train=TrainConfig(
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
            ),
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    src = _source(data, fmt, spec, maps)
    with console.status("preparing sequences"):
        prepared = prepare(
            src.events, top_category_chars=src.top_category_chars, history_len=cfg.model.history
        )
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
    from common.learning.dataset import prepare
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


@app.command("simulate")
def simulate_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    clients: Annotated[
        int | None, typer.Option(help="Number of clients; default one per region.")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = RUN["num_server_rounds"],
    epsilon: Annotated[float, typer.Option(help="Per-client privacy budget ε (user-level).")] = RUN[
        "epsilon"
    ],
    delta: Annotated[float, typer.Option(help="Per-client δ; must stay below 1/users.")] = RUN[
        "delta"
    ],
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="Train with DP-SGD.")] = RUN["dp"],
    strategy: Annotated[str, typer.Option(help="fedavg, fedadam or fedprox.")] = RUN["strategy"],
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = RUN[
        "local_epochs"
    ],
    batch_size: Annotated[int, typer.Option(help="Expected users per DP batch.")] = RUN[
        "batch_size"
    ],
    lr: Annotated[float, typer.Option(help="Client learning rate (Adam).")] = RUN["lr"],
    clip_norm: Annotated[float, typer.Option(help="Per-user gradient clipping norm.")] = RUN[
        "clip_norm"
    ],
    min_clients: Annotated[int, typer.Option(help="Fewest trained clients a round needs.")] = RUN[
        "min_clients"
    ],
    central_dp: Annotated[
        str,
        typer.Option(
            help="Client-level DP on the server as a second layer (Flower's wrappers): "
            "off, fixed or adaptive clipping."
        ),
    ] = RUN["central_dp"],
    central_noise: Annotated[
        float, typer.Option(help="Server-side noise multiplier (client-level DP).")
    ] = RUN["central_noise"],
    central_clip: Annotated[
        float, typer.Option(help="Server-side clipping norm of a client's update.")
    ] = RUN["central_clip"],
    audit_holdout: Annotated[
        float,
        typer.Option(help="Share of users kept out of training, for `fedshop privacy audit`."),
    ] = RUN["audit_holdout"],
    hidden: Annotated[int, typer.Option(help="BERT hidden size.")] = RUN["hidden"],
    layers: Annotated[int, typer.Option(help="BERT layers.")] = RUN["layers"],
    max_len: Annotated[int, typer.Option(help="Events the encoder attends over at once.")] = RUN[
        "max_len"
    ],
    windows: Annotated[
        int, typer.Option(help="Windows of max-len events read (and trained on) per user.")
    ] = RUN["windows"],
    seed: Annotated[int, typer.Option(help="Random seed.")] = RUN["seed"],
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = RUN[
        "device"
    ],
    out: OutOpt = Path("runs/simulation"),
    fresh: Annotated[
        bool, typer.Option(help="Delete OUT first instead of resuming its checkpoint.")
    ] = False,
) -> None:
    """Simulate the federation on this machine (Flower simulation engine) with per-client DP."""
    import shutil

    from common.data.partition import plan
    from common.data.sources import run_events
    from simulations.simulate import simulate

    out = out.resolve()
    try:
        cfg = RunConfig(
            num_server_rounds=rounds,
            epsilon=epsilon,
            delta=delta,
            dp=dp,
            strategy=strategy,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            clip_norm=clip_norm,
            min_clients=min_clients,
            audit_holdout=audit_holdout,
            central_dp=central_dp,
            central_noise=central_noise,
            central_clip=central_clip,
            hidden=hidden,
            layers=layers,
            max_len=max_len,
            windows=windows,
            seed=seed,
            device=device,
            data=str(data.resolve()) if data else "",
            format=fmt,
            out=str(out),
        )
        events, _ = run_events(cfg.data, cfg.format, cfg.synth.model_dump_json())
    except (ValueError, DataError) as exc:
        raise fail(str(exc)) from exc
    parts = plan(events, clients or events["region"].nunique())
    if fresh and out.exists():
        shutil.rmtree(out)
    console.print(
        f"[bold]{len(parts)} clients[/]: {', '.join(p.name for p in parts)}; {rounds} rounds, "
        + (f"DP ε={epsilon:g}, δ={delta:g} per client" if dp else "no DP")
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=rounds, status="starting Flower")

        def on_poll(history: list[dict]) -> None:
            if not history:
                return
            last = history[-1]
            done = sum(1 for r in last["clients"] if r["status"] == "trained")
            eps = max((r.get("epsilon", 0.0) for r in last["clients"]), default=0.0)
            hr = last.get("evaluate", {}).get("hr10", float("nan"))
            status = f"round {last['round']}: {done}/{len(parts)} trained, HR@10 {hr:.3f}"
            if dp:
                status += f", max ε {eps:.2f}"
            progress.update(
                task, completed=len([r for r in history if "evaluate" in r]), status=status
            )

        try:
            result = simulate(cfg, len(parts), on_poll)
        except RuntimeError as exc:
            raise fail(str(exc)) from exc
    if not result.ok:
        tail = result.log.read_text().splitlines()[-15:]
        raise fail(
            f"the simulation did not finish; last lines of {result.log}:\n" + "\n".join(tail)
        )
    _print_simulation(result.summary, out)


def _print_simulation(summary: dict, out: Path) -> None:
    rounds = json.loads((out / "rounds.json").read_text())
    table = Table(title=f"fedshop simulation: {summary['outcome']}")
    for col in ("round", "trained", "declined", "HR@10", "NDCG@10", "WAPE", "WAPE 4w-MA"):
        table.add_column(col, justify="right")
    for r in rounds:
        ev = r.get("evaluate", {})
        status = [c["status"] for c in r["clients"]]
        table.add_row(
            str(r["round"]),
            str(status.count("trained")),
            str(status.count("declined")),
            *(
                f"{ev[k]:.4f}" if k in ev else "-"
                for k in ("hr10", "ndcg10", "wape", "wape-moving-average")
            ),
        )
    console.print(table)
    privacy = summary["privacy"]
    if privacy["dp"]:
        title = f"privacy spent per client (user-level; {privacy['accountant']} accountant)"
        pt = Table(title=title)
        for col in (
            "client",
            "ε spent",
            "ε budget",
            "δ",
            "noise σ",
            "sample rate",
            "declined rounds",
        ):
            pt.add_column(col, justify="right")
        for name, c in privacy["clients"].items():
            pt.add_row(
                name,
                f"{c.get('epsilon', 0):.3f}",
                f"{c.get('epsilon-budget', 0):g}",
                f"{c.get('delta', 0):g}",
                f"{c.get('noise-multiplier', 0):.3f}",
                f"{c.get('sample-rate', 0):.4f}",
                ", ".join(map(str, c["declined_rounds"])) or "-",
            )
        console.print(pt)
        from privacy import report as privacy_report

        with console.status("verifying the privacy ledgers (RDP, PRV, PLD)"):
            written = privacy_report.write(out)
        colour = "green" if written["verified"] else "bold red"
        headline = escape(written["verdict"]["headline"])
        console.print(f"privacy report: {out / 'privacy_report.html'} ([{colour}]{headline}[/])")
    if central := privacy.get("central_dp"):
        console.print(
            f"client-level DP on the server ({central['wrapper']}): ε = "
            f"{central['epsilon']:.3f} at δ = {central['delta']:g} after "
            f"{central['releases']} release(s), Flower's accountant"
        )
    console.print(
        f"model, card, metrics and plots in {out}/ (HR/NDCG: full ranking, held-out last event)"
    )


ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model", help="Run folder with model.safetensors, model_card.json, catalog.json."
    ),
]
EventsOpt = Annotated[
    Path, typer.Option("--events", help="Event log to read users' recent events from.")
]


def _exported(model: Path):
    from common.learning.inference import load_exported

    try:
        return load_exported(model)
    except ValueError as exc:
        raise fail(str(exc)) from exc


@app.command("recommend")
def recommend_cmd(
    model: ModelOpt,
    events: EventsOpt,
    fmt: FormatOpt = "auto",
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="User id(s); default: the first --limit users."),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Items per user.")] = 10,
    limit: Annotated[int, typer.Option(help="Users shown when no --user is given.")] = 5,
) -> None:
    """Top-k next items (with categories) for users, from their most recent events."""
    from common.learning.inference import recommend

    exp = _exported(model)
    frame = _source(events, fmt, None, None).events
    if user:
        missing = sorted(set(user) - set(frame["user_id"].astype(str)))
        if missing:
            raise fail(f"{events}: no events for user(s) {', '.join(missing)}")
        frame = frame[frame["user_id"].isin(user)]
    else:
        frame = frame[frame["user_id"].isin(frame["user_id"].drop_duplicates().head(limit))]
    recs = recommend(exp, frame, k)
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
) -> None:
    """Next week's demand per region and top category with its interval, beside the robust level
    and the moving average."""
    import pandas as pd

    from common.learning.demand import forecast_next_week
    from common.learning.forecasting import QUANTILES

    exp = _exported(model)
    frame = _source(events, fmt, None, None).events
    try:
        table_df = forecast_next_week(exp, frame)
    except ValueError as exc:
        raise fail(f"{events}: {exc}") from exc
    week = table_df["week_start"].iloc[0]
    low, high = QUANTILES
    table = Table(
        title=f"units in the week from {week}: forecast = level (median of recent weeks, window "
        f"chosen by backtest) × the model's ratio, with its {low:.0%}–{high:.0%} interval",
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


def _units(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


@app.command("monitor")
def monitor_cmd(
    model: ModelOpt,
    events: EventsOpt,
    fmt: FormatOpt = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for the plots. Default: <model run>/monitor."),
    ] = None,
    weeks: Annotated[int, typer.Option(help="Last full weeks to check.")] = 4,
) -> None:
    """Region × category weeks whose actual fell outside the forecast interval, forecast from
    the data before each week; one PNG per flagged series."""
    from common.learning.monitor import monitor, plot_alerts

    exp = _exported(model)
    frame = _source(events, fmt, None, None).events
    try:
        result = monitor(exp, frame, weeks)
    except ValueError as exc:
        raise fail(f"{events}: {exc}") from exc
    low, high = result.quantiles
    if result.alerts.empty:
        console.print(f"no alerts: every series stayed inside its {low:.1%}–{high:.1%} interval")
        return
    folder = out or (model if model.is_dir() else model.parent) / "monitor"
    paths = plot_alerts(result, folder)
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


@app.command("train-local")
def train_local_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    clients: Annotated[
        int | None, typer.Option(help="Number of clients; default one per region.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per region.")] = 3,
    out: OutOpt = Path("runs/local-only"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Each region trains alone on its own users (no federation, no DP): the floor to beat."""
    from common.learning.model import ModelConfig
    from common.learning.training import TrainConfig
    from simulations.central import CentralConfig
    from simulations.local_only import train_local_only

    src = _source(data, fmt, None, None)
    cfg = CentralConfig(model=ModelConfig(), train=TrainConfig(epochs=epochs, seed=seed))
    with console.status("training every region alone"):
        results = train_local_only(
            src.events, src.top_category_chars, clients or src.events["region"].nunique(), cfg
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"source": src.name, **results}, indent=2))
    p = results["pooled"]
    console.print(
        f"local-only, pooled over {p['users']:,} users: HR@10 {p['hr@10']:.4f}  "
        f"NDCG@10 {p['ndcg@10']:.4f}  WAPE {p['wape']:.3f}  "
        f"(full ranking; results in {out}/results.json)"
    )
