"""The BERT behavior model: a from-scratch `transformers` BERT over event sequences, two heads.

Inputs per event: item, category, day-of-week, hour, log time-gap; per user: region. The encoder
runs causally (`is_decoder=True`), so the state at event i only sees events ≤ i; that lets one
pass train next-item prediction and demand forecasting at every position without leaking the
future. Heads: (a) next-item scores over the catalog, (b) log-rate of the units a user buys per
top-level category over the coming horizon, so regional demand is a sum over users.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import BertConfig, BertModel

from common.sequences import GAP_BUCKETS, IGNORE


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    intermediate: int = Field(256, ge=8)
    dropout: float = Field(0.2, ge=0, lt=1)
    max_len: int = Field(50, ge=2)
    demand_weight: float = Field(0.5, ge=0)


class CatalogShape(BaseModel):
    """Vocabulary sizes the model is built for (from the shared catalog)."""

    model_config = ConfigDict(extra="forbid")
    item_rows: int
    items: int
    categories: int
    top_categories: int
    regions: int


class BehaviorModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: CatalogShape) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden ({cfg.hidden}) must be a multiple of heads ({cfg.heads})")
        self.cfg, self.shape = cfg, shape
        bert_cfg = BertConfig(
            vocab_size=shape.item_rows,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=cfg.max_len,
            type_vocab_size=1,
            pad_token_id=0,
            is_decoder=True,
            attn_implementation="sdpa",
        )
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.category = nn.Embedding(shape.categories, cfg.hidden)
        self.dow = nn.Embedding(8, cfg.hidden)
        self.hour = nn.Embedding(25, cfg.hidden)
        self.gap = nn.Embedding(GAP_BUCKETS, cfg.hidden)
        self.region = nn.Embedding(shape.regions, cfg.hidden)
        self.item_head = nn.Linear(cfg.hidden, shape.items)
        self.demand_head = nn.Linear(cfg.hidden, shape.top_categories)

    def encode(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        dow: torch.Tensor,
        hour: torch.Tensor,
        gap: torch.Tensor,
        region: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden state per event, [B, L, H]; sequences are right-padded with zeros."""
        batch, length = items.shape
        embeds = (
            self.bert.embeddings.word_embeddings(items)
            + self.category(cats)
            + self.dow(dow)
            + self.hour(hour)
            + self.gap(gap)
            + self.region(region)[:, None, :]
        )
        # Per-sample position/type ids of shape [B, L]: a broadcast [1, L] breaks Opacus's
        # per-sample gradients of those embeddings (opacus issue 841).
        positions = torch.arange(length, device=items.device).expand(batch, length)
        return self.bert(
            inputs_embeds=embeds,
            position_ids=positions.contiguous(),
            token_type_ids=torch.zeros_like(items),
        ).last_hidden_state

    def forward(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        dow: torch.Tensor,
        hour: torch.Tensor,
        gap: torch.Tensor,
        region: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(items, cats, dow, hour, gap, region)
        return self.item_head(h), self.demand_head(h)

    def last_state(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """State after each user's last event, [B, H]."""
        h = self.encode(*batch[:6])
        length = batch[9]
        return h[torch.arange(h.shape[0], device=h.device), length - 1]


def per_user_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], demand_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss per user [B] (the DP unit): next-item CE + weighted Poisson demand NLL.

    Each user's positions are averaged first, so every user weighs the same whatever their
    history length. `model` may be wrapped (e.g. by Opacus). Returns (total, next_item, demand).
    """
    items, cats, dow, hour, gap, region, next_item, demand, demand_mask = batch[:9]
    logits, log_rate = model(items, cats, dow, hour, gap, region)
    valid = next_item != IGNORE
    ce = F.cross_entropy(
        logits.flatten(0, 1), next_item.clamp_min(0).flatten(), reduction="none"
    ).view_as(next_item)
    rec = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
    nll = F.poisson_nll_loss(log_rate, demand, log_input=True, full=False, reduction="none")
    mask = demand_mask.float()
    dem = (nll.mean(-1) * mask).sum(1) / mask.sum(1).clamp_min(1)
    return rec + demand_weight * dem, rec, dem


def trim(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the padding columns that no user in this batch needs (sequences are right-padded)."""
    width = int(batch[9].max().clamp_min(1))
    return tuple(t[:, :width] if t.dim() >= 2 else t for t in batch)
