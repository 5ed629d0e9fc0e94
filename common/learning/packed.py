"""Layers over a batch's real positions only, with exact per-user gradients under Opacus.

Sequences are right-padded, and most of a batch is padding when one user's history is long. The
heads therefore run on the real positions packed into [P, ·], each tagged with the batch row
(user) it belongs to. Opacus computes per-sample gradients module by module from the batch
dimension of each module's input, which here would be positions, not users; the grad samplers
registered below sum each user's positions instead, so clipping still bounds a user's whole
contribution. Opacus' documented extension point (`register_grad_sampler`) and its
`max_batch_len` attribute (as its DPLSTM uses for packed sequences) carry this.

The encoder runs on windows, not users: a user's history of up to `windows × max_len` events
is cut into its windows and the empty ones are dropped, so a batch row of the encoder is one
window. `set_window_users` tags the encoder's modules with the user of each window, and the
grad samplers of the layer types inside it (Opacus' own, wrapped below) sum a user's windows
into one per-user gradient.

The item table is the one exception to dense per-user gradients: a user touches a few hundred of
its tens of thousands of rows, and a dense [users, rows, dim] gradient per step (zero-filled,
copied and reduced several times by Opacus) was most of what DP-SGD cost over plain training.
`SparseRowsEmbedding` keeps each use's per-user gradient as (user, row, vector) entries on the
weight instead (`take_user_rows`); `privacy.engine` clips the whole per-user gradient with them,
exactly as Opacus would with the dense tensor. The category table is dense in one use (the
category output, `RowsLinear`) and sparse in the other (the input embedding): its dense per-user
gradient is written once into a buffer the layer reuses, the sparse entries are added to it at
clipping, and Opacus never zero-fills, copies or sums a [users, 2,006, 64] tensor of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from torch import nn

_ROW_ENTRIES = "_fedshop_row_entries"
_DENSE_ROWS = "_fedshop_dense_rows"
_BUFFER = "_fedshop_buffer"
_WINDOW_USER = "_fedshop_window_user"


def set_users(model: nn.Module, users: int) -> None:
    """Tell the packed layers how many users the batch holds (Opacus reads `max_batch_len`
    to scale and size per-sample gradients; their own inputs only count positions)."""
    for module in model.modules():
        if isinstance(module, PackedLinear | PackedEmbedding):
            module.max_batch_len = users


def set_window_users(encoder: nn.Module, window_user: torch.Tensor, users: int) -> None:
    """Tell the encoder's layers that batch row w of their input is a window of user
    `window_user[w]`, of `users` in the batch: their per-sample gradients are then per user.
    Rows w < `users` must be one window of user w each (`BehaviorModel._windows`)."""
    for module in encoder.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            setattr(module, _WINDOW_USER, window_user)
            module.max_batch_len = users


def pack(length: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, slot) of every real position of a right-padded batch, ordered by owner."""
    real = torch.arange(width, device=length.device)[None, :] < length[:, None]
    owner, slot = real.nonzero(as_tuple=True)
    return owner, slot


class PackedLinear(nn.Linear):
    """`nn.Linear` on packed positions: x [P, in], owner [P] (ascending) → [P, out]."""

    def forward(self, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedEmbedding(nn.Embedding):
    """`nn.Embedding` lookups tagged with their user: index [Q], owner [Q] → [Q, dim]."""

    def forward(self, index: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.weight)


class SparseRowsEmbedding(PackedEmbedding):
    """A `PackedEmbedding` whose per-user gradients stay sparse (see the module docstring)."""


class RowsLinear(PackedLinear):
    """A `PackedLinear` whose weight is tied to a `SparseRowsEmbedding`: its per-user weight
    gradients go to the weight's `UserRows.dense`, where the table's entries join them."""


class BucketBias(nn.Module):
    """A learned scalar per bucket, looked up for bucket ids [B, ...] → [B, ..., 1]: the same
    function and weight shape as `nn.Embedding(buckets, 1)`, with gradients (plain and per
    user) as bincounts. Looked up at every (user, position, position) of a batch, the
    embedding's backward was the largest single op of a training step."""

    def __init__(self, buckets: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(buckets, 1))

    def forward(self, bucket: torch.Tensor) -> torch.Tensor:
        return _BucketLookup.apply(self.weight, bucket)


class _BucketLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bucket)
        ctx.buckets = weight.shape[0]
        return weight[bucket]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bucket,) = ctx.saved_tensors
        summed = torch.bincount(bucket.flatten(), grad.flatten(), minlength=ctx.buckets)
        return summed.to(grad.dtype)[:, None], None


class UserRows(NamedTuple):
    """A weight's per-user gradient as a backward pass recorded it outside Opacus: the sum of its
    dense uses [users, rows, dim] (None without one) and, per sparse use, entries
    (user × rows + row [E], gradient [E, dim])."""

    dense: torch.Tensor | None
    entries: list[tuple[torch.Tensor, torch.Tensor]]


def take_user_rows(weight: nn.Parameter) -> UserRows | None:
    """The per-user gradient recorded on a `SparseRowsEmbedding` / `RowsLinear` weight, removed
    from it; None for any other parameter (or before a backward pass)."""
    dense, entries = weight.__dict__.pop(_DENSE_ROWS, None), weight.__dict__.pop(_ROW_ENTRIES, None)
    if dense is None and entries is None:
        return None
    return UserRows(dense, entries or [])


def _per_user_products(
    x: torch.Tensor, owner: torch.Tensor, backprops: torch.Tensor, into: torch.Tensor
) -> torch.Tensor:
    """Adds each user's Σ backprops ⊗ x over their positions into `into[user]` [users, out, in]."""
    bounds = torch.searchsorted(owner, torch.arange(len(into) + 1, device=owner.device)).tolist()
    for user in range(len(into)):
        start, end = bounds[user], bounds[user + 1]
        if end > start:
            into[user].addmm_(backprops[start:end].T, x[start:end])
    return into


def _reused_zeros(layer: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A zeroed [shape] tensor from a buffer the layer keeps between steps: a fresh tensor this
    large is fresh pages from the OS, and faulting them in cost three times the zeroing. The
    buffer grows with headroom, as Poisson batches vary in size."""
    buffer = layer.__dict__.get(_BUFFER)
    if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
        buffer = like.new_empty((shape[0] * 3 // 2 + 1, *shape[1:]))
        layer.__dict__[_BUFFER] = buffer
    return buffer[: shape[0]].zero_()


@register_grad_sampler([PackedLinear, RowsLinear])
def _linear_grad_sample(
    layer: PackedLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    x, owner = activations[0], activations[1]
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _weight_per_user(layer, x, owner, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        bias = backprops.new_zeros(layer.max_batch_len, layer.out_features)
        out[layer.bias] = bias.index_add_(0, owner, backprops)
    return out


def _weight_per_user(
    layer: PackedLinear, x: torch.Tensor, owner: torch.Tensor, backprops: torch.Tensor
) -> torch.Tensor:
    """The weight's per-user gradients for Opacus; a `RowsLinear` keeps them on the weight
    (`take_user_rows`) and gives Opacus an empty per-user tensor, as the sparse table does."""
    users = layer.max_batch_len
    if not isinstance(layer, RowsLinear):
        grad = backprops.new_zeros(users, *layer.weight.shape)
        return _per_user_products(x, owner, backprops, grad)
    kept = layer.weight.__dict__
    if kept.get(_DENSE_ROWS) is None:
        kept[_DENSE_ROWS] = _reused_zeros(layer, (users, *layer.weight.shape), backprops)
    _per_user_products(x, owner, backprops, kept[_DENSE_ROWS])
    return backprops.new_zeros(users, 0)


@register_grad_sampler(PackedEmbedding)
def _embedding_grad_sample(
    layer: PackedEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    index, owner = activations[0], activations[1]
    users = layer.max_batch_len
    rows, dim = layer.weight.shape
    grad = torch.zeros(users * rows, dim, device=index.device, dtype=backprops.dtype)
    grad.index_add_(0, owner * rows + index, backprops)
    return {layer.weight: grad.view(users, rows, dim)}


@register_grad_sampler(SparseRowsEmbedding)
def _sparse_rows_grad_sample(
    layer: SparseRowsEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    index, owner = activations[0], activations[1]
    rows = layer.weight.shape[0]
    layer.weight.__dict__.setdefault(_ROW_ENTRIES, []).append((owner * rows + index, backprops))
    # Opacus still counts this use (tied weights are promoted after their last use): an empty
    # per-user tensor stands in for the dense one the entries replace.
    return {layer.weight: backprops.new_zeros(layer.max_batch_len, 0)}


@register_grad_sampler(BucketBias)
def _bucket_grad_sample(
    layer: BucketBias, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    bucket = activations[0]
    users, buckets = bucket.shape[0], layer.weight.shape[0]
    user = torch.arange(users, device=bucket.device)[:, None]
    key = (user * buckets + bucket.reshape(users, -1)).flatten()
    summed = torch.bincount(key, backprops.flatten(), minlength=users * buckets)
    return {layer.weight: summed.to(backprops.dtype).view(users, buckets, 1)}


_Sampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def _summed_over_windows(sampler: _Sampler) -> _Sampler:
    """Opacus' grad sampler for a layer type, with a tagged layer's per-window gradients summed
    per user (`set_window_users`); untagged layers keep Opacus' per-row gradients."""

    def per_user(
        layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        samples = sampler(layer, activations, backprops)
        window_user = getattr(layer, _WINDOW_USER, None)
        if window_user is None:
            return samples
        users = layer.max_batch_len
        # Rows < users are one window per user: adding the extra windows to them in place
        # spares a zeroed copy of every window's gradient. On a 2-D input Opacus' bias
        # samplers return the backprops themselves, which under a summed loss are the gradient
        # autograd passes on to the layers below: that one is added into a copy.
        return {
            p: _own(g, backprops)[:users].index_add_(0, window_user[users:], g[users:])
            for p, g in samples.items()
        }

    return per_user


def _own(grad: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """`grad`, or a copy of it where it shares memory with `backprops`."""
    shared = grad.untyped_storage().data_ptr() == backprops.untyped_storage().data_ptr()
    return grad.clone() if shared else grad


for _layer in (nn.Linear, nn.LayerNorm, nn.Embedding):
    register_grad_sampler(_layer)(_summed_over_windows(GradSampleModule.GRAD_SAMPLERS[_layer]))
