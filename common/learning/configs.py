"""The model's and the centralized trainer's settings: plain pydantic, so reading a run
configuration or building the CLI's options loads neither torch nor transformers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=8, description="BERT hidden size.")
    layers: int = Field(2, ge=1, description="BERT layers.")
    heads: int = Field(2, ge=1, description="Attention heads (must divide hidden).")
    intermediate: int = Field(256, ge=8, description="BERT feed-forward size.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout in the encoder.")
    max_len: int = Field(50, ge=2, description="Events the encoder attends over at once.")
    windows: int = Field(2, ge=1, description="Windows of max-len events read per user.")
    item_dim: int = Field(16, ge=1, description="Trainable coordinates per item (plus a bias).")
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
    device: str = Field("auto", description="auto (CUDA if present), cpu or cuda.")
