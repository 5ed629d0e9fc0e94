"""`fedshop`: the command-line front door. This module only wires the command groups together;
each group is a module: `data` (check, synth), `train` (baselines, train-central, train-local,
simulate), `serve` (recommend, forecast, monitor) and `privacy` (keys, verify, report, audit).
Options shared by several commands live in `shared`."""

from simulations.cli.data import data_app
from simulations.cli.shared import app

app.add_typer(data_app, name="data")

from simulations.cli import train  # noqa: E402, I001  (registration order = help order)
from simulations.cli import serve  # noqa: E402
from simulations.cli.privacy import privacy_app  # noqa: E402
from simulations.cli import deploy  # noqa: E402, F401  (certs, node …)

app.add_typer(privacy_app, name="privacy")

__all__ = ["app", "serve", "train"]
