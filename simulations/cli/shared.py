"""What every command shares: the app, the consoles, common options and reading events."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import pandas as pd
import typer
from click.core import ParameterSource
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from common.atomic import StorageError
from common.data.events import MIN_EVENTS, DataError
from common.data.formats import FORMATS, LoadResult
from common.data.partition import Partition, users_per_part
from common.data.sources import Source, read_source, require_history
from common.data.synth import SynthConfig


class _Commands(TyperGroup):
    """A file no command could write (disk full, read-only) is one clear line and exit 2,
    whichever command it was: every writer goes through `common.atomic`, which left the old
    file as it was."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StorageError as exc:
            raise fail(str(exc)) from exc


app = typer.Typer(
    cls=_Commands,
    help="fedshop: federated, differentially private training of e-commerce behavior models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
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
    typer.Option(
        "--map",
        help="FIELD=COLUMN for your own format, e.g. --map user_id=customer,item_id=sku.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
M = TypeVar("M", bound=BaseModel)


def fail(message: str) -> typer.Exit:
    # Messages quote file names, headers and cells: "[b]" in one is text, not Rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=2)


def events_from(
    data: Path | None,
    fmt: str = "auto",
    spec: Path | None = None,
    maps: list[str] | None = None,
    synth: SynthConfig | None = None,
    history: bool = True,
) -> Source:
    """The events a command reads, saying which format was used and why; a bad file is a clear
    error naming it, never a traceback. With `history` (commands that train or evaluate), a
    file without one user of enough events is such an error too."""
    try:
        src = read_source(data, fmt, spec, maps, synth)
        if history:
            require_history(src.events, src.name, src.load)
    except DataError as exc:
        raise fail(str(exc)) from exc
    if src.load is not None:
        err.print(f"[dim]{escape(src.name)}: {escape(src.load.reason)}[/]")
        dropped = _dropped(src.load)
        if dropped:
            err.print(f"[yellow]{escape(src.name)}: {escape(dropped)}[/]")
    return src


def _dropped(load: LoadResult) -> str:
    """What of the file is not in the events, for a warning: rejected rows by reason, and
    columns no field maps to ('' when nothing was dropped)."""
    said = []
    if reasons := load.rejected_by_reason():
        counts = ", ".join(f"{reason} {n}" for reason, n in reasons.items())
        said.append(f"{len(load.rejected)} of {load.rows_read} rows rejected ({counts})")
    if load.ignored_columns:
        said.append(f"columns ignored: {', '.join(load.ignored_columns)}")
    if not said:
        return ""
    return "; ".join(said) + " (fedshop data check writes the rejected rows with their reasons)"


def check_federation(
    source: str,
    events: pd.DataFrame,
    parts: list[Partition],
    batch_size: int,
    min_clients: int,
    origin: Callable[[str], str] = lambda key: "",
) -> None:
    """Refuse a federation that cannot run before Flower starts; warn about clients that cannot
    train or will sample every user at every step. `origin(key)` prefixes a refusal with where
    that key was set (a config file's path), empty where the command line set it."""
    try:
        require_history(events, source)
    except DataError as exc:
        raise fail(str(exc)) from exc
    users = users_per_part(events, parts, MIN_EVENTS)
    names = [p.name for p in parts]
    idle = [n for n, u in zip(names, users, strict=True) if u == 0]
    able = len(parts) - len(idle)
    if min_clients > able:
        raise fail(
            f"{origin('min_clients')}--min-clients {min_clients}: only {able} of the "
            f"{len(parts)} clients have a user with {MIN_EVENTS} or more events in {source}, so "
            "no round could ever finish"
        )
    if batch_size > max(users):
        raise fail(
            f"{origin('batch_size')}--batch-size {batch_size}: more than the users of any "
            f"client in {source} (at most {max(users):,} with {MIN_EVENTS}+ events); lower it or "
            "use fewer clients"
        )
    if idle:
        err.print(
            f"[yellow]warning:[/] {escape(', '.join(idle))}: no user with {MIN_EVENTS} or more "
            "events; these clients cannot train"
        )
    small = [n for n, u in zip(names, users, strict=True) if 0 < u < batch_size]
    if small:
        err.print(
            f"[yellow]warning:[/] {escape(', '.join(small))}: fewer users than --batch-size "
            f"{batch_size}; each of their steps uses every user (sample rate 1, no privacy "
            "amplification by sampling)"
        )


def options_of(*models: type[BaseModel], aliases: dict[str, list[str]] | None = None):
    """Give a command one option per field of each of `models`: kebab-case name, the field's
    default and description, so each model stays the one place a setting is defined.

    The command receives `given`: the fields set on the command line (the models' own defaults
    fill the rest, and a config file may sit between them).
    """
    aliases = aliases or {}
    infos = {name: info for model in models for name, info in model.model_fields.items()}

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.name != "given"
        ]
        fields = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=info.default,
                annotation=Annotated[
                    info.annotation,
                    typer.Option(
                        f"--{name.replace('_', '-')}",
                        *aliases.get(name, []),
                        help=info.description or name.replace("_", " ").capitalize() + ".",
                    ),
                ],
            )
            for name, info in infos.items()
        ]
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

        @functools.wraps(command)
        def wrapper(ctx: typer.Context, **values: Any) -> None:
            given = {
                name: values[name]
                for name in infos
                if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
            }
            command(**{k: v for k, v in values.items() if k not in infos}, given=given)

        params = [context, *own, *fields]
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def only(model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """The part of `given` that belongs to `model`."""
    return {k: v for k, v in given.items() if k in model.model_fields}


def validated(model: type[M], values: dict[str, Any], where: str = "") -> M:
    """`model(**values)`, or a clear error naming the option (and the file it came from)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        # A check across fields (e.g. hidden vs heads) belongs to no single option.
        option = "-".join(str(p) for p in first["loc"]).replace("_", "-")
        option = f"--{option}: " if option else ""
        raise fail(f"{where}{option}{first['msg']}") from exc
