"""What every command shares: the app, the consoles, common options and reading events."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from click.core import ParameterSource
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from common.data.events import DataError
from common.data.formats import FORMATS
from common.data.sources import Source, read_source
from common.data.synth import SynthConfig

app = typer.Typer(
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
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def events_from(
    data: Path | None,
    fmt: str = "auto",
    spec: Path | None = None,
    maps: list[str] | None = None,
    synth: SynthConfig | None = None,
) -> Source:
    """The events a command reads, saying which format was used and why; a bad file is a clear
    error naming it, never a traceback."""
    try:
        src = read_source(data, fmt, spec, maps, synth)
    except DataError as exc:
        raise fail(str(exc)) from exc
    if src.load is not None:
        err.print(f"[dim]{escape(src.name)}: {escape(src.load.reason)}[/]")
    return src


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
        option = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-")
        raise fail(f"{where}{option}: {first['msg']}") from exc
