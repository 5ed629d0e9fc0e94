"""fedshop ClientApp: trains the shared model on this client's users only, with user-level DP.

Flower starts a fresh ClientApp process for every message, and three of the four messages of a
SecAgg+ round are key agreement that needs no model. So this module stays light: the training
and evaluation code (`clients.rounds`: torch, transformers, Opacus, pandas; about 6 s to import
on 2 cores) is imported when a message first needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.secure_aggregation import secure_aggregation

app = ClientApp(mods=[secure_aggregation])


def _rounds() -> ModuleType:
    """`clients.rounds`, imported on first use (Python caches it after that)."""
    return importlib.import_module("clients.rounds")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One training round (`clients.rounds.train`)."""
    return _rounds().train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """One evaluation (`clients.rounds.evaluate`)."""
    return _rounds().evaluate(msg, context)
