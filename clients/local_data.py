"""Finding and preparing the one client's own events.

Deployment: the SuperNode's `node_config` names the data (`data-path`, optional `data-format`,
`data-spec` (a dataset spec file) or `data-columns` (`field=column,…`),
`client-name`, `state-dir`, `catalog`, `signing-key`). Simulation: `partition-id` /
`num-partitions` pick this client's users out of the run's data source. Either way only this
client's events are loaded.

Data too small for a head costs that head only (see `common.learning.dataset.prepare`); data
with no user of MIN_EVENTS events is `CannotTakePart`, which the client answers with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from logging import ERROR
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from common.data.catalog import Catalog
from common.data.events import MIN_EVENTS, DataError
from common.data.partition import audit_non_members, plan, select
from common.data.sources import read_source, run_events
from common.learning.dataset import NoHistory, Prepared, prepare
from common.run_files import CLIENTS
from common.runconfig import RunConfig
from privacy.signing import CLIENT_PUBLIC_KEY, client_key, load_or_create

NO_USERS = f"cannot take part: no user with {MIN_EVENTS} or more events"
# What went wrong stays in this node's log: a data error can quote rows of the file.
UNREADABLE = "cannot take part: its data or catalog cannot be read (the node's log says why)"


class CannotTakePart(Exception):
    """This client's data supports no head: every request gets `reason` (one line, no counts)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


@dataclass(frozen=True)
class ClientData:
    name: str
    prepared: Prepared
    state_dir: Path
    key_path: Path  # Ed25519 key that signs this client's privacy ledger


@lru_cache(maxsize=8)
def _prepare(
    key: tuple[Any, ...],
    catalog_path: str,
    calendar: tuple[str, str],
    history_len: int,
    holdout: float,
) -> tuple[str, Prepared | None]:
    """This client's name and prepared data; None (cached like the rest) when no user has
    MIN_EVENTS events."""
    kind, *rest = key
    if kind == "file":
        path, fmt, spec, columns, name = rest
        src = read_source(
            Path(path), fmt, Path(spec) if spec else None, [columns] if columns else None
        )
        events, top_chars = src.events, src.top_category_chars
    else:
        source, partition_id, num_partitions = rest
        everything, top_chars = run_events(*source)
        part = plan(everything, num_partitions)[partition_id]
        name, events = part.name, select(everything, part)
    catalog = Catalog.load(catalog_path)
    try:
        prepared = prepare(
            events,
            top_category_chars=top_chars,
            history_len=history_len,
            demand_start=calendar[0] or None,
            demand_end=calendar[1] or None,
            catalog=catalog,
        )
    except NoHistory:
        return name, None
    if holdout > 0:  # audit non-members: evaluated like everyone, never trained on
        keep = ~audit_non_members(prepared.train.users, holdout)
        prepared = replace(prepared, train=prepared.train.subset(np.flatnonzero(keep)))
    return name, prepared


def load_client_data(
    node_config: dict[str, Any], cfg: RunConfig, catalog_path: str, calendar: tuple[str, str]
) -> ClientData:
    """This client's prepared data, name, state folder and signing key; CannotTakePart when
    its data supports no head (before any key or state is made). `calendar`: the platform's
    first demand day and the day after its last ("" = this client's own data's)."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        name = str(node_config.get("client-name", Path(path).stem.split(".")[0]))
        fmt = str(node_config.get("data-format", "auto"))
        spec, columns = (str(node_config.get(k, "")) for k in ("data-spec", "data-columns"))
        key = ("file", path, fmt, spec, columns, name)
        default_state = Path(path).parent / f"{name}.fedshop"
    else:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        source = (cfg.data, cfg.format, cfg.synth.model_dump_json(), cfg.spec, cfg.columns)
        key = ("partition", source, pid, n)
        default_state = None
    # A deployed client keeps its own copy of the platform catalog; the server's path is only
    # valid where the server's files are visible (simulation).
    catalog_path = str(node_config.get("catalog", catalog_path))
    try:
        name, prepared = _prepare(key, catalog_path, calendar, cfg.model.history, cfg.audit_holdout)
    except (DataError, OSError, ValueError) as exc:
        who = key[-1] if key[0] == "file" else f"partition {key[2]}"
        log(ERROR, "client %s cannot read its data: %s", who, exc)
        raise CannotTakePart(str(who), UNREADABLE) from exc
    if prepared is None:
        raise CannotTakePart(name, NO_USERS)
    state_dir = (
        Path(str(node_config.get("state-dir", ""))) if node_config.get("state-dir") else None
    )
    state_dir = state_dir or default_state or Path(cfg.out) / CLIENTS / name
    key = node_config.get("signing-key")
    key_path = Path(str(key)) if key else client_key(state_dir, Path(cfg.out), name)
    # The verifier finds the public key beside the ledger; made here, before any spend, a key
    # that does not match the ledger's fails the client early.
    load_or_create(key_path, publish=state_dir / CLIENT_PUBLIC_KEY)
    return ClientData(name, prepared, state_dir, key_path)
