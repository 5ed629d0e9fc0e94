"""The model's and the centralized trainer's settings: plain pydantic, so reading a run
configuration or building the CLI's options loads neither torch nor transformers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Where models train and run: auto = CUDA where present.
Device = Literal["auto", "cpu", "cuda"]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Upper bounds far above any model this project trains: a corrupt or hostile model card
    # must be a config error, not a request for terabytes.
    hidden: int = Field(64, ge=8, le=4096, description="BERT hidden size.")
    layers: int = Field(2, ge=1, le=48, description="BERT layers.")
    heads: int = Field(2, ge=1, le=64, description="Attention heads (must divide hidden).")
    intermediate: int = Field(256, ge=8, le=16384, description="BERT feed-forward size.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout in the encoder.")
    max_len: int = Field(50, ge=2, le=512, description="Events the encoder attends over at once.")
    windows: int = Field(2, ge=1, le=64, description="Windows of max-len events read per user.")
    item_dim: int = Field(
        16, ge=1, le=1024, description="Trainable coordinates per item (plus a bias)."
    )
    demand_weight: float = Field(0.5, ge=0, description="Weight of the demand loss.")

    @property
    def history(self) -> int:
        """Events per user the model reads (and trains on)."""
        return self.max_len * self.windows


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, ge=1, description="Training epochs (the best on validation is kept).")
    batch_size: int = Field(128, ge=1, description="Users per batch.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    seed: int = Field(0, description="Random seed.")
    device: Device = Field("auto", description="auto (CUDA if present), cpu or cuda.")


# The model's priors: scalars that every user's data informs alike (the mixture's gate biases,
# the per-bucket scores). Adam moves a coordinate by about lr per step at most, so at the
# clients' lr three DP rounds of ~55 steps move one by < 1: a prior could barely leave its
# start, e.g. the neighbour gate's p ≈ 5 %. They learn FAST_LR times faster. The names are
# `common.learning.model.BehaviorModel`'s parameters (a test holds them to it); they live here,
# without torch, because they cross the process boundary: the server bounds each array's update
# by its own lr.
FAST_PARAMETERS = frozenset(
    {
        "gate.bias",
        "neighbour_gate.bias",
        "neighbour_split.bias",
        "neighbour.weight",
        "recency.weight",
        "repeat_habit.weight",
        "repeat_habit.bias",
        "basket.bias",
        "habit.bias",
        "popularity_weight.bias",
    }
)
FAST_LR = 10.0


def lr_scale(name: str) -> float:
    """The factor on the base learning rate for the parameter (state-dict key) `name`."""
    return FAST_LR if name in FAST_PARAMETERS else 1.0
