"""`fedshop baselines | train-central | train-local | simulate`: training runs and what they
must beat."""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.atomic import write_json
from common.data.catalog import Catalog
from common.data.events import DataError
from common.data.partition import plan
from common.data.sources import Source, run_events
from common.learning.configs import ModelConfig, TrainConfig
from common.messages import (
    DELTA,
    EPSILON,
    EPSILON_BUDGET,
    HR10,
    NDCG10,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    WAPE,
    WAPE_MOVING_AVERAGE,
)
from common.run_files import CATALOG, CHECKPOINT, RESULTS, ROUNDS
from common.runconfig import RunConfig
from simulations.cli.shared import (
    DataOpt,
    FormatOpt,
    MapOpt,
    OutOpt,
    SpecOpt,
    app,
    check_federation,
    console,
    err,
    events_from,
    fail,
    only,
    options_of,
    validated,
)

if TYPE_CHECKING:
    import pandas as pd

    from common.data.partition import Partition
    from common.learning.dataset import Prepared
    from simulations.central import CentralConfig
    from simulations.simulate import SimulationResult

# Each command imports the model's stack (torch, transformers, Opacus) when it runs: building the
# CLI, and so `fedshop --help`, needs only the configs.

ClientsOpt = Annotated[
    int | None, typer.Option(min=1, help="Number of clients; default one per region.")
]


@app.command("baselines")
def baselines_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: OutOpt = Path("runs/baselines"),
) -> None:
    """Popularity, repeat- and transition-aware and forecasting baselines under the evaluation
    protocol."""
    from simulations.central import baselines, save_run

    src = events_from(data, fmt, spec, maps)
    with console.status("computing baselines"):
        prepared = _prepared(src)
        base = baselines(prepared)
    save_run(out, None, prepared, {"source": src.name, "baselines": base})
    _print_results(
        src.name,
        _rows(base["recommendation"]),
        _rows(base["forecast"]),
        prepared.demand_reason,
    )


@app.command("train-central")
@options_of(ModelConfig, TrainConfig)
def train_central_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    out: OutOpt = Path("runs/central"),
    skip_baselines: Annotated[bool, typer.Option(help="Do not compute the baselines.")] = False,
    given: dict | None = None,
) -> None:
    """Train the BERT behavior model centrally, without privacy; compare it with the baselines,
    and, beside them, what the data's owner would serve: the model beside the transition-aware
    rule (`fedshop recommend`)."""
    from common.learning.popularity import RuleInputs
    from simulations.central import baselines, save_run, served, train_central

    cfg = _central_config(given or {})
    src = events_from(data, fmt, spec, maps)
    with console.status("preparing sequences"):
        prepared = _prepared(src, history_len=cfg.model.history)
    inputs = None if skip_baselines else RuleInputs.of(prepared)
    base = None if inputs is None else baselines(prepared, inputs)
    with Progress(*_columns(), console=console) as progress:
        epoch_task = progress.add_task("epochs", total=cfg.train.epochs, status="")
        user_task = progress.add_task("users", total=len(prepared.train), status="")

        def on_progress(kind: str, n: float) -> None:
            if kind == "train":
                progress.advance(user_task, n)
            else:
                progress.advance(epoch_task)
                progress.reset(user_task)

        model, results = train_central(prepared, cfg, on_progress)
        progress.remove_task(user_task)
    if base:
        with console.status("weighing the model beside the transition-aware rule"):
            results["served"] = served(model, prepared, base["recommendation"], inputs)["served"]
    results = {"source": src.name, "config": cfg.model_dump(), "bert": results, "baselines": base}
    save_run(out, model, prepared, results)
    rows = [("BERT (central, non-private)", results["bert"]["test"])]
    forecast = [(f"BERT {k.replace('_', '-')}", v) for k, v in results["bert"]["forecast"].items()]
    if base:
        rows = _rows(base["recommendation"]) + rows
        rows.append(("BERT + transition-aware rule (served)", results["bert"]["served"]))
        forecast = _rows(base["forecast"]) + forecast
    _print_results(src.name, rows, forecast, prepared.demand_reason)
    console.print(f"results in {out / RESULTS}")


@app.command("train-local")
@options_of(ModelConfig, TrainConfig)
def train_local_cmd(
    data: DataOpt = None,
    fmt: FormatOpt = "auto",
    spec: SpecOpt = None,
    maps: MapOpt = None,
    clients: ClientsOpt = None,
    out: OutOpt = Path("runs/local-only"),
    given: dict | None = None,
) -> None:
    """Each region trains alone on its own users (no federation, no DP): the floor to beat."""
    from common.learning.dataset import NoHistory
    from simulations.local_only import train_local_only

    cfg = _central_config(given or {})
    src = events_from(data, fmt, spec, maps)
    with console.status("training every region alone"):
        try:
            results = train_local_only(
                src.events, src.top_category_chars, clients or src.events["region"].nunique(), cfg
            )
        except NoHistory as exc:
            raise fail(f"{src.name}: {exc}") from exc
    write_json(out / RESULTS, {"source": src.name, **results})
    for name, why in results["skipped"].items():
        console.print(f"[yellow]skipped[/] {escape(name)}: {escape(why)}")
    for name, c in results["clients"].items():
        if "no_forecast" in c:
            console.print(f"[dim]{escape(name)}: {escape(c['no_forecast'])}[/]")
    ranking = results["ranking"]
    rows = [
        *_rows(ranking["rules_own_region"], ", own region's"),
        ("local model alone", ranking["model"]),
        ("local model + own region's transition rule (served)", ranking["served"]),
    ]
    console.print(_ranking_table(f"{src.name}, every region alone", rows))
    p = results["pooled"]
    console.print(
        f"local-only, pooled over {p['users']:,} users: HR@10 {p['hr@10']:.4f}  "
        f"NDCG@10 {p['ndcg@10']:.4f}  WAPE {p['wape']:.3f}  "
        f"(full ranking; results in {out / RESULTS})"
    )


@app.command("simulate")
@options_of(RunConfig, aliases={"num_server_rounds": ["--rounds"]})
def simulate_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file of run-config keys (as in pyproject.toml's tool.flwr.app.config); "
            "options given on the command line win.",
        ),
    ] = None,
    clients: ClientsOpt = None,
    fresh: Annotated[
        bool, typer.Option(help="Delete the run folder first instead of resuming its checkpoint.")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            envvar="RAY_ADDRESS",
            metavar="HOST:PORT",
            help="Run the clients as actors on this running Ray cluster: the head's address, "
            "as `ray start --head` prints it. Default: a Ray of the run's own on this machine. "
            "Run this command on a node of the cluster; every node needs this Python "
            "environment and the data and --out folder at the same paths "
            "(docs/ray-cluster.md).",
        ),
    ] = None,
    given: dict | None = None,
) -> None:
    """Simulate the federation with Flower's simulation engine, DP on by default: on this
    machine, or with the clients on a Ray cluster (--ray-address).

    Every option below is a key of the Flower run config (pyproject.toml), with its default.
    Ends with the model, metrics, plots and, under DP, the verified privacy report.
    """
    from simulations.simulate import ray_env, simulate

    given = given or {}
    cfg, from_file = _run_config(config, given)
    try:  # an unreachable cluster refused before the data are read, not after
        ray_env(ray_address)
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    try:
        events, chars = run_events(
            cfg.data, cfg.format, cfg.synth.model_dump_json(), cfg.spec, cfg.columns
        )
    except DataError as exc:
        raise fail(str(exc)) from exc
    parts = plan(events, clients or events["region"].nunique())
    check_federation(
        cfg.data or "the synthetic data",
        events,
        parts,
        cfg.batch_size,
        cfg.min_clients,
        lambda key: f"{config}: " if key in from_file else "",
    )
    out = Path(cfg.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    if cfg.resume and (out / CHECKPOINT).exists():
        from common.learning.dataset import catalog_shape
        from common.learning.model import BehaviorModel
        from server import checkpoint

        try:  # a bad checkpoint named here, not as a traceback at the end of Flower's log
            shape = catalog_shape(Catalog.load(out / CATALOG))
            checkpoint.load(out, BehaviorModel(cfg.model, shape).state_dict())
        except ValueError as exc:
            raise fail(f"{exc}; or pass --fresh") from exc
    console.print(
        f"[bold]{len(parts)} clients[/]: {', '.join(p.name for p in parts)}; "
        f"{cfg.num_server_rounds} rounds, "
        + (f"DP ε={cfg.epsilon:g}, δ={cfg.delta:g} per client" if cfg.dp else "no DP")
    )
    with Progress(*_columns(), console=console) as progress:
        task = progress.add_task("rounds", total=cfg.num_server_rounds, status="starting Flower")

        def on_poll(history: list[dict]) -> None:
            if history:
                progress.update(
                    task,
                    completed=len([r for r in history if "evaluate" in r]),
                    status=_round_status(history[-1], len(parts), cfg.dp),
                )

        try:
            result = simulate(cfg, len(parts), on_poll, ray_address=ray_address)
        except RuntimeError as exc:
            raise fail(str(exc)) from exc
    if not result.ok:
        tail = result.log.read_text().splitlines()[-15:]
        raise fail(
            f"the simulation did not finish; last lines of {result.log}:\n" + "\n".join(tail)
        )
    _print_simulation(result, out)
    _print_exact(out, events, chars, parts, cfg)


def _prepared(src: Source, **options: int) -> Prepared:
    """The command's data prepared; data no head can use is a named error (exit 2)."""
    from common.learning.dataset import NoHistory, prepare

    try:
        return prepare(src.events, top_category_chars=src.top_category_chars, **options)
    except NoHistory as exc:
        raise fail(f"{src.name}: {exc}") from exc


def _central_config(given: dict) -> CentralConfig:
    """The model's and the trainer's settings given on the command line, validated."""
    from common.learning.training import pick_device
    from simulations.central import CentralConfig

    cfg = CentralConfig(
        model=validated(ModelConfig, only(ModelConfig, given)),
        train=validated(TrainConfig, only(TrainConfig, given)),
    )
    try:  # before any data is read: this machine, not the data, decides it
        pick_device(cfg.train.device)
    except ValueError as exc:
        raise fail(f"--device: {exc}") from exc
    return cfg


def _run_config(path: Path | None, given: dict) -> tuple[RunConfig, set[str]]:
    """The file's keys under the options given, paths made absolute (Flower runs elsewhere);
    and the keys whose value came from the file."""
    values: dict = {}
    if path is not None:
        try:
            values = {k.replace("-", "_"): v for k, v in tomllib.loads(path.read_text()).items()}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise fail(f"{path}: not a readable TOML run config ({exc})") from exc
    cfg = validated(RunConfig, values | given, f"{path}: " if path else "")
    absolute = cfg.model_copy(
        update={
            "data": str(Path(cfg.data).resolve()) if cfg.data else "",
            "out": str(Path(cfg.out).resolve()),
        }
    )
    return absolute, set(values) - set(given)


def _columns() -> tuple:
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )


def _round_status(last: dict, clients: int, dp: bool) -> str:
    done = sum(1 for r in last["clients"] if r["status"] == "trained")
    hr = last.get("evaluate", {}).get(HR10, float("nan"))
    status = f"round {last['round']}: {done}/{clients} trained, HR@10 {hr:.3f}"
    if dp:
        eps = max((r.get(EPSILON, 0.0) for r in last["clients"]), default=0.0)
        status += f", max ε {eps:.2f}"
    return status


def _label(name: str, m: dict) -> str:
    """A baseline's name, with what was chosen on held-in data (weights, a level's window)."""
    if "weights" in m:
        return f"{name} ({', '.join(f'{k} {v:g}' for k, v in m['weights'].items())})"
    if "window" in m:
        return f"{name} ({m['window'] or 'all'} weeks)"
    return name


def _print_results(
    title: str,
    rows: list[tuple[str, dict]],
    forecast: list[tuple[str, dict]],
    no_forecast: str | None = None,
) -> None:
    console.print(_ranking_table(title, rows))
    if no_forecast:
        console.print(f"demand per region × top category × week: {escape(no_forecast)}")
        return
    fc = Table(title="demand per region × top category × week, last 4 weeks held out")
    for col in ("forecast", "WAPE", "MAE", "interval coverage"):
        fc.add_column(col)
    for name, m in forecast:
        fc.add_row(_label(name, m), f"{m['wape']:.3f}", f"{m['mae']:.2f}", _coverage(m))
    console.print(fc)


def _rows(named: dict[str, dict], suffix: str = "") -> list[tuple[str, dict]]:
    """Table rows from results keyed by their snake_case names."""
    return [(k.replace("_", " ") + suffix, v) for k, v in named.items()]


def _ranking_table(title: str, rows: list[tuple[str, dict]]) -> Table:
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
    return table


def _coverage(m: dict) -> str:
    if "coverage" not in m:
        return ""
    if math.isnan(m["coverage"]):
        return "history too short"
    low, high = m["interval"]
    return f"{m['coverage']:.1%} in the {low:.0%}–{high:.0%} interval"


def _print_simulation(result: SimulationResult, out: Path) -> None:
    summary = result.summary
    rounds = json.loads((out / ROUNDS).read_text())
    table = Table(title=f"fedshop simulation: {summary['outcome']}")
    columns = ("round", "trained", "declined", "refused", "HR@10", "NDCG@10", "WAPE", "WAPE 4w-MA")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rounds:
        ev = r.get("evaluate", {})
        status = [c["status"] for c in r["clients"]]
        table.add_row(
            str(r["round"]),
            *(str(status.count(s)) for s in ("trained", "declined", "refused")),
            *(
                f"{ev[k]:.4f}" if k in ev else "-"
                for k in (HR10, NDCG10, WAPE, WAPE_MOVING_AVERAGE)
            ),
        )
    console.print(table)
    privacy = summary["privacy"]
    if privacy["dp"]:
        _print_privacy(privacy)
    if result.privacy_report:
        colour = "green" if result.privacy_report["verified"] else "bold red"
        headline = escape(result.privacy_report["verdict"]["headline"])
        console.print(f"privacy report: {result.privacy_report_path} ([{colour}]{headline}[/])")
    if central := privacy.get("central_dp"):
        console.print(
            f"client-level DP on the server ({central['wrapper']}): ε = "
            f"{central['epsilon']:.3f} at δ = {central['delta']:g} after "
            f"{central['releases']} release(s), Flower's accountant"
        )
    console.print(
        f"model, card, metrics and plots in {out}/ (HR/NDCG: full ranking, held-out last event)"
    )


def _print_exact(
    out: Path, events: pd.DataFrame, chars: int | None, parts: list[Partition], cfg: RunConfig
) -> None:
    """The final model against the strongest simple rules, exactly, on the same users."""
    from simulations.central import evaluate_exported

    try:
        with console.status("evaluating the final model beside the baselines"):
            exact = evaluate_exported(out, events, chars, parts, cfg.demand_start, cfg.demand_end)
    except ValueError as exc:  # the run succeeded; only its model is unusable
        err.print(f"[yellow]warning:[/] no exact table beside the baselines: {escape(str(exc))}")
        return
    write_json(out / RESULTS, exact)
    name = f"fedshop, federated, {f'DP ε={cfg.epsilon:g}' if cfg.dp else 'no DP'}"
    base = exact["baselines"]
    rows = [
        *_rows(base["recommendation"], ", every region's data"),
        *_rows(base["recommendation_own_region"], ", own region's"),
        (f"{name}, alone", exact["bert"]["test"]),
        (f"{name} + own region's transition rule (served)", exact["bert"]["served"]),
    ]
    forecast = _rows(base["forecast"])
    model = exact["bert"]["forecast"].items()
    _print_results(
        f"{name}, exact (a simulation holds every client's data; the rounds above are the "
        "clients' noisy releases; each client's users scored with its own data, pooled)",
        rows,
        [*forecast, *((f"{name}, {k.replace('_', '-')}", v) for k, v in model)],
        base.get("no_forecast"),
    )
    console.print(f"exact results in {out / RESULTS}")


def _print_privacy(privacy: dict) -> None:
    title = f"privacy spent per client (user-level; {privacy['accountant']} accountant)"
    table = Table(title=title)
    columns = (
        "client", "ε spent", "ε budget", "δ", "noise σ", "sample rate", "declined rounds",
        "refused / failed rounds",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    for name, c in privacy["clients"].items():
        # a client that never trained (refused, failed) reported no mechanism: shown as "-"
        shown = [(EPSILON, ".3f"), (EPSILON_BUDGET, "g"), (DELTA, "g"),
                 (NOISE_MULTIPLIER, ".3f"), (SAMPLE_RATE, ".4f")]  # fmt: skip
        table.add_row(
            name,
            *(format(c[key], spec) if key in c else "-" for key, spec in shown),
            ", ".join(map(str, c["declined_rounds"])) or "-",
            ", ".join(map(str, c.get("refused_rounds", []) + c.get("failed_rounds", []))) or "-",
        )
    console.print(table)
