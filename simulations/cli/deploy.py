"""`fedshop certs` and `fedshop node …`: what the platform needs to run the deployment engine
with TLS and SuperNode authentication, and the registry that binds each node to one client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privacy.signing import KeyFileError, load_public, public_pem
from server.certs import DEFAULT_HOSTS, make_certs, make_node_key
from server.node_registry import Binding, Registry, RegistryError
from simulations.cli.shared import app, console, fail

node_app = typer.Typer(
    help="SuperNode authentication keys and the registry binding each node to one client.",
    no_args_is_help=True,
)
app.add_typer(node_app, name="node")

RegistryOpt = Annotated[
    Path, typer.Option("--registry", help="The platform's node registry (JSON).")
]
SuperLinkArg = Annotated[
    str | None,
    typer.Option(
        "--superlink",
        help="SuperLink connection in the Flower CLI's config.toml; default: its default one.",
    ),
]


@app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the CA and certificate.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or IP SuperNodes dial the SuperLink at (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of both certificates.")] = 365,
) -> None:
    """Create a TLS CA and the SuperLink's certificate.

    SANs: the --host values (default 127.0.0.1 and localhost). ca.crt goes to every SuperNode
    and `flwr` user; ca.key and server.key stay secret (server.key on the SuperLink only).
    """
    try:
        files = make_certs(out, host or list(DEFAULT_HOSTS), days)
    except FileExistsError as exc:
        raise fail(str(exc)) from exc
    table = Table("file", "who gets it")
    table.add_row(str(files.ca_cert), "every SuperNode (--root-certificates), every flwr user")
    table.add_row(str(files.server_cert), "the SuperLink (--ssl-certfile)")
    table.add_row(str(files.server_key), "the SuperLink only, secret (--ssl-keyfile)")
    table.add_row(str(files.ca_key), "nobody: keep offline, it signs new SuperLink certificates")
    console.print(table)


@node_app.command("key")
def node_key(
    names: Annotated[list[str], typer.Argument(help="SuperNodes to make keys for.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.node / .pub.")] = Path(
        "keys"
    ),
) -> None:
    """Create SuperNode authentication key pairs (P-384, OpenSSH).

    NAME.node stays on the SuperNode (--auth-supernode-private-key); NAME.node.pub goes to the
    platform, which registers it.
    """
    for name in names:
        try:
            public = make_node_key(out / f"{name}.node")
        except FileExistsError as exc:
            raise fail(str(exc)) from exc
        console.print(f"{name}: {out / f'{name}.node'} (secret), {public} (register it)")


def _flwr(*args: str) -> subprocess.CompletedProcess:
    """The Flower CLI beside this interpreter (the one whose version matches the SuperLink's
    installation here), with its JSON output."""
    flwr = Path(sys.executable).parent / "flwr"
    return subprocess.run(
        [str(flwr) if flwr.exists() else "flwr", *args, "--format", "json"],
        capture_output=True,
        text=True,
    )


def _json_tail(stdout: str) -> dict:
    """The JSON object the Flower CLI prints last (`--format json` may print a banner first)."""
    return json.loads(stdout[stdout.index("{") :]) if "{" in stdout else {}


@node_app.command("register")
def register(
    name: Annotated[str, typer.Argument(help="The client name this SuperNode reports.")],
    node_key: Annotated[
        Path, typer.Option("--node-key", help="The SuperNode's public key (NAME.node.pub).")
    ],
    ledger_key: Annotated[
        Path, typer.Option("--ledger-key", help="The client's ledger public key (NAME.pub).")
    ],
    registry: RegistryOpt,
    superlink: SuperLinkArg = None,
) -> None:
    """Register a SuperNode's key and bind its node to NAME.

    Runs `flwr supernode register` and records the node id it returns, with the node's key and
    NAME's ledger key, in the registry the ServerApp reads (run config `registry`).
    """
    try:
        reg = Registry.load(registry) if registry.exists() else Registry()
        ledger_pem = public_pem(load_public(ledger_key)).decode()
        node_public = node_key.read_text().strip()
        if name in reg.clients:  # checked before the SuperLink learns of the key
            raise RegistryError(f"client {name!r} is already bound to node {reg.node_of(name)}")
    except (KeyFileError, OSError, RegistryError) as exc:
        raise fail(str(exc)) from exc
    done = _flwr("supernode", "register", str(node_key), *([superlink] if superlink else []))
    node_id = _json_tail(done.stdout).get("node-id")
    if done.returncode != 0 or node_id is None:
        raise fail(f"flwr supernode register failed: {done.stdout.strip()} {done.stderr.strip()}")
    try:
        reg.add(name, Binding(int(node_id), node_public, ledger_pem))
    except RegistryError as exc:
        raise fail(f"{exc}; the SuperLink registered node {node_id}: unregister it") from exc
    reg.save(registry)
    console.print(f"{name}: node {node_id}, registered and bound in {registry}")


@node_app.command("unregister")
def unregister(
    name: Annotated[str, typer.Argument(help="The client whose SuperNode leaves.")],
    registry: RegistryOpt,
    superlink: SuperLinkArg = None,
) -> None:
    """Unregister NAME's SuperNode and drop its binding.

    Removing a region, or the first half of rotating its key.
    """
    try:
        reg = Registry.load(registry)
        node_id = reg.remove(name).node_id
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    done = _flwr("supernode", "unregister", str(node_id), *([superlink] if superlink else []))
    if done.returncode != 0:
        raise fail(f"flwr supernode unregister failed: {done.stdout.strip()} {done.stderr.strip()}")
    reg.save(registry)
    console.print(f"{name}: node {node_id} unregistered and removed from {registry}")
