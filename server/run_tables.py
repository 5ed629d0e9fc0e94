"""A run's per-round tables: every round's metrics and each client's reply and privacy spend as
JSON/CSV, and their PNG plots (the compliance report is `privacy.report`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from common.atomic import write_json, write_with
from common.messages import EPSILON, EPSILON_BUDGET, HR10, NDCG10, WAPE, WAPE_MOVING_AVERAGE
from common.run_files import CLIENTS_CSV, METRICS_CSV, PLOTS, ROUNDS


def client_table(history: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for rec in history for row in rec["clients"]])


def metric_table(history: list[dict]) -> pd.DataFrame:
    rows = [
        {
            "round": r["round"],
            "seconds": r.get("seconds"),
            **r.get("evaluate", {}),
            **{f"train-{k}": v for k, v in r.get("train", {}).items()},
        }
        for r in history
        if "evaluate" in r
    ]
    return pd.DataFrame(rows)


def write_tables(out: Path, history: list[dict]) -> None:
    write_json(out / ROUNDS, history)
    metrics, clients = metric_table(history), client_table(history)
    write_with(out / METRICS_CSV, lambda p: metrics.to_csv(p, index=False))
    write_with(out / CLIENTS_CSV, lambda p: clients.to_csv(p, index=False))


def plot(out: Path, history: list[dict]) -> list[Path]:
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    paths = []
    metrics = metric_table(history)
    if not metrics.empty:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for key in (HR10, NDCG10):
            axes[0].plot(
                metrics["round"], metrics[key], marker="o", label=key.upper().replace("10", "@10")
            )
        axes[0].set(title="Next-item (full ranking, held-out last event)", xlabel="round")
        axes[0].legend()
        for key, label in (
            (WAPE, "model (calibrated)"),
            (WAPE_MOVING_AVERAGE, "4-week moving average"),
        ):
            if key in metrics:
                axes[1].plot(metrics["round"], metrics[key], marker="o", label=label)
        axes[1].set(title="Demand WAPE, held-out weeks", xlabel="round")
        axes[1].legend()
        fig.tight_layout()
        paths.append(_save(fig, out / PLOTS / "metrics.png"))
    clients = client_table(history)
    if EPSILON_BUDGET in clients:  # DP runs only
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in clients[clients["status"] != "failed"].groupby("client"):
            ax.plot(rows["round"], rows[EPSILON], marker="o", label=str(name))
        ax.axhline(clients[EPSILON_BUDGET].max(), color="red", linestyle="--", label="budget")
        ax.set(title="Privacy spent per client (user-level ε)", xlabel="round", ylabel="ε")
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(_save(fig, out / PLOTS / "epsilon.png"))
    return paths


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
