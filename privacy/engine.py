"""Opacus' `PrivacyEngine`, with per-user clipping that reads the item table's per-user
gradients from their non-zero rows, and no batch-summed gradients DP-SGD would not read.

Everything else is Opacus': the grad samplers, Poisson sampling, the noise, the accountant.
Four things change. The wrapped model takes each layer's backprops from a hook on its output
tensor rather than a full backward hook, and keeps each per-user gradient its grad sampler
returns rather than a copy (`OutputHookedGradSampleModule`). It no longer has autograd compute
the batch-summed gradient of weights whose per-user gradients Opacus takes anyway
(`skip_summed_gradients`). Its update is the clipped, noisy sum over the expected batch size
whichever way the loss was reduced, so a model trained on the sum of its per-user losses
(`loss_reduction="sum"`, as the clients' is) spares Opacus rescaling every layer's backprops by
the batch size. And in
`clip_and_accumulate`, a `SparseRowsEmbedding` weight (the item table, tens of
thousands of rows of which a user touches a few hundred) records its per-user gradients as
(user, row, vector) entries instead of a dense [users, rows, dim] tensor, and a weight also used
densely (the category table, through a `RowsLinear`) records that use's [users, rows, dim]
gradient beside the entries (`common.learning.packed`). Summing the entries per (user, row), or
adding them to the dense part, gives each user's exact gradient on that table, so the per-user
norm over all parameters, the clipping factor and the clipped sum are the ones Opacus computes
from its own tensors, at a fraction of the memory traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import opacus
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import prepare_layer
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)
from opacus.utils.module_utils import requires_grad
from torch import nn

from common.learning.packed import take_user_rows

SMALL_PARAMETER = 4096  # coordinates below which a parameter is clipped with the others alike
_FROZEN = "_fedshop_frozen"  # a layer's weights `skip_summed_gradients` took out of the graph


class SparseRowsDPOptimizer(DPOptimizer):
    """`DPOptimizer` (flat clipping) that also clips parameters with sparse per-user rows."""

    def clip_and_accumulate(self) -> None:
        sparse, dense = {}, {}
        for p in self.params:
            recorded = take_user_rows(p)
            if recorded is None:
                dense[p] = self._get_flat_grad_sample(p).to(p.dtype)
            elif recorded.dense is None:
                sparse[p] = _per_user_rows(recorded.entries, p.shape[0], p.dtype)
            else:
                dense[p] = _with_entries(recorded.dense, recorded.entries)
        users = len(self._get_flat_grad_sample(self.params[0]))
        squared = torch.zeros(users, device=self.params[0].device, dtype=self.params[0].dtype)
        # The many small parameters (biases, norms, small tables) as one [users, Σ numel]
        # tensor: one norm and one weighted sum instead of two calls each, whose overhead
        # outweighed their work.
        small = [p for p in dense if p.numel() < SMALL_PARAMETER]
        start = squared.new_zeros(users, 0)  # what is left to join when nothing is small
        joined = torch.cat([start, *(dense.pop(p).flatten(1) for p in small)], 1)
        for grad in [*dense.values(), joined]:
            squared += torch.linalg.vector_norm(grad.flatten(1), dim=1).square()
        for user, _, grad in sparse.values():
            squared.index_add_(0, user, grad.square().sum(1))
        factor = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        clipped = {p: torch.einsum("i,i...", factor, grad) for p, grad in dense.items()}
        summed = (factor @ joined).split([p.numel() for p in small])
        clipped |= {p: grad.view_as(p) for p, grad in zip(small, summed, strict=True)}
        for p, (user, row, grad) in sparse.items():
            clipped[p] = torch.zeros_like(p).index_add_(0, row, grad * factor[user, None])
        for p in self.params:
            p.summed_grad = clipped[p] if p.summed_grad is None else p.summed_grad + clipped[p]
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        # One draw for every parameter at once, with Opacus' own `_generate_noise` (secure mode
        # as configured). Drawn per parameter, as Opacus does, each of ~70 calls also zero-fills
        # a tensor it discards: 1.4 % of a Ta-Feng-sized DP step, side by side in one process.
        # Each parameter adds its slice of the draw, so no copy of all the sums is made first.
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        sizes = [p.numel() for p in self.params]
        reference = self.params[0].new_empty(sum(sizes))  # its shape, device and dtype
        noise = _generate_noise(
            self.noise_multiplier * self.max_grad_norm, reference, self.generator, self.secure_mode
        )
        for p, part in zip(self.params, noise.split(sizes), strict=True):
            p.grad = p.summed_grad + part.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        # The update is the noisy sum over the expected batch size with either loss reduction:
        # "sum" only tells the model's hooks that the backprops are per-user gradients already
        # (Opacus itself would leave a summed loss's update unscaled). Opacus' own re-reads
        # `accumulated_iterations`, itself a pass over every parameter, once per parameter:
        # ~2 ms of a step with this model's ~70 tensors.
        scale = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            p.grad /= scale

    def empty_step(self) -> None:
        """The step of a batch Poisson sampling left empty: no gradient, the noise all the same
        (and its accounting, through Opacus' step hook). Skipping it would leave a trace in the
        released update of whether anyone was sampled, which depends on who is in the data."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.step()

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        for p in self.params:
            take_user_rows(p)  # a step that never reached clipping must not leak into the next


def _with_entries(
    dense: torch.Tensor, entries: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The dense per-user gradient [users, rows, dim] with the sparse uses' entries added."""
    flat = dense.view(-1, dense.shape[-1])
    for key, grad in entries:
        flat.index_add_(0, key, grad.to(dense.dtype))
    return dense


def _per_user_rows(
    entries: list[tuple[torch.Tensor, torch.Tensor]], rows: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user, row, gradient) per distinct (user, row), summing every use of the weight."""
    key = torch.cat([k for k, _ in entries])
    unique, inverse = torch.unique(key, return_inverse=True)
    grads = torch.cat([g for _, g in entries]).to(dtype)
    summed = grads.new_zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads)
    return torch.div(unique, rows, rounding_mode="floor"), unique % rows, summed


def skip_summed_gradients(wrapped: GradSampleModule) -> None:
    """Stop autograd from also computing the batch-summed gradient of every weight Opacus takes
    per-user gradients of: DP-SGD never reads it (the optimizer sets `grad` from the clipped
    per-user sum), and on 2 cores it was ~10 ms of a ~130 ms Ta-Feng step.

    While a layer trains under Opacus' hooks, its own weights leave the autograd graph for its
    forward call. The gradient with respect to its output still flows, so the hook on that
    output (`OutputHookedGradSampleModule`) still receives the layer's backprops; where the
    weights were the output's only way into the graph (an embedding's indices), the output
    becomes a leaf that asks for its gradient, with the same effect. The hooks join Opacus' own,
    so `remove_hooks` removes them too, and gives back weights that a forward call which raised
    left out of the graph.

    Autograd no longer saves these layers' inputs, so it no longer refuses a backward pass after
    one of them was changed in place; Opacus' copy of the input, and the per-user gradient, would
    then be wrong. The model changes none, and `test_dp_sgd_clips_each_users_exact_gradient`
    (each parameter's per-user gradient against the user's own, alone) would catch one."""
    layers = [
        layer
        for layer in wrapped.modules()
        if type(layer) in GradSampleModule.GRAD_SAMPLERS
        and any(p.requires_grad for p in layer.parameters(recurse=False))
    ]

    def freeze(layer: nn.Module, args: tuple) -> None:
        _thaw(layer)  # a forward call that raised never thawed
        if layer.training and torch.is_grad_enabled() and wrapped.hooks_enabled:
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            for p in own:
                p.requires_grad_(False)
            layer.__dict__[_FROZEN] = own

    def thaw(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not _thaw(layer):
            return None
        return output.requires_grad_() if not output.requires_grad else None

    for layer in layers:
        wrapped.autograd_grad_sample_hooks += [
            layer.register_forward_pre_hook(freeze),
            # First of the forward hooks: the capturing ones must find the weights trainable
            # and the output asking for its gradient.
            layer.register_forward_hook(thaw, prepend=True),
        ]
    wrapped.autograd_grad_sample_hooks.append(_ThawOnRemove(layers))


def _thaw(layer: nn.Module) -> bool:
    """Puts back the weights `freeze` took out of the layer's graph; whether there were any."""
    own = layer.__dict__.pop(_FROZEN, None)
    for p in own or ():
        p.requires_grad_(True)
    return own is not None


class _ThawOnRemove:
    """A handle in Opacus' hook list: removing the hooks thaws every layer."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            _thaw(layer)


class OutputHookedGradSampleModule(GradSampleModule):
    """Opacus' `GradSampleModule`, taking each layer's backprops from a hook on the layer's output
    tensor instead of a full backward hook on the layer: both receive the gradient with respect
    to the output, and the per-user gradients are Opacus' own from there on. A full backward hook
    wraps the layer's inputs and outputs in an autograd function of its own at every call, and
    Opacus hooks ~40 layers of this model; the tensor hook made a DP step of the Ta-Feng-sized
    model 5–8 % faster, side by side in one process. Nor does it warn where no input of the layer
    needs a gradient (an embedding's indices), as the full hook did.

    Its grad samplers are Opacus' registered ones, each keeping the per-user gradients it
    returns as the parameter's own (`_kept`)."""

    def add_hooks(
        self,
        *,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        force_functorch: bool = False,
    ) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks = []
        self.GRAD_SAMPLERS = {
            kind: _kept(sampler) for kind, sampler in GradSampleModule.GRAD_SAMPLERS.items()
        }
        on_output = partial(
            self._hook_output, loss_reduction=loss_reduction, batch_first=batch_first
        )
        for module in self.iterate_submodules(self._module):
            if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            self.autograd_grad_sample_hooks += [
                module.register_forward_hook(self.capture_activations_hook),
                module.register_forward_hook(on_output),
            ]
        self.enable_hooks()

    def _hook_output(
        self,
        module: nn.Module,
        args: tuple,
        output: torch.Tensor,
        *,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        # `capture_activations_hook`'s own test: one backprops for each activations it kept.
        if not (
            self.hooks_enabled
            and module.training
            and torch.is_grad_enabled()
            and requires_grad(module)
        ):
            return

        def capture(grad: torch.Tensor) -> None:
            self.capture_backprops_hook(
                module, args, (grad,), loss_reduction=loss_reduction, batch_first=batch_first
            )

        output.register_hook(capture)


def _kept(sampler: Callable[..., dict]) -> Callable[..., dict]:
    """A grad sampler that keeps the per-user gradients it computes as the parameters' own and
    leaves Opacus nothing to store. Opacus copies each into a zeroed tensor of its own
    (`create_or_accumulate_grad_sample`): ~2 % of a Ta-Feng-sized DP step, on fixed batches.
    A weight used twice (tied) gets the sum, and a short one zero rows, out of place: a kept
    tensor may be a view of the backprops autograd passes on."""

    def keep(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        for param, sample in sampler(layer, activations, backprops).items():
            if not param.requires_grad:
                continue
            if len(sample) < layer.max_batch_len:  # zero rows for the rest, as Opacus pads
                missing = sample.new_zeros(layer.max_batch_len - len(sample), *sample.shape[1:])
                sample = torch.cat([sample, missing])
            current = getattr(param, "_current_grad_sample", None)
            param._current_grad_sample = sample if current is None else current + sample
        return {}

    return keep


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus' engine whose `make_private` returns a `SparseRowsDPOptimizer`, and wraps the model
    in an `OutputHookedGradSampleModule` that skips the gradients DP-SGD does not read
    (`skip_summed_gradients`)."""

    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        **_: object,  # max_grad_norm: only Opacus' ghost clipping reads it here
    ) -> GradSampleModule:
        if grad_sample_mode != "hooks" or not wrap_model or isinstance(module, GradSampleModule):
            raise ValueError(
                "fedshop's DP-SGD wraps a plain module in Opacus' hooks (grad_sample_mode='hooks')"
            )
        self.validate(module=module, optimizer=None, data_loader=None)
        wrapped = OutputHookedGradSampleModule(
            module, batch_first=batch_first, loss_reduction=loss_reduction
        )
        skip_summed_gradients(wrapped)
        return wrapped

    def _prepare_optimizer(self, **kwargs: object) -> DPOptimizer:
        built = super()._prepare_optimizer(**kwargs)
        if type(built) is not DPOptimizer:
            raise ValueError("fedshop's DP-SGD uses flat clipping in one process (Opacus hooks)")
        return SparseRowsDPOptimizer(
            optimizer=built.original_optimizer,
            noise_multiplier=built.noise_multiplier,
            max_grad_norm=built.max_grad_norm,
            expected_batch_size=built.expected_batch_size,
            loss_reduction=built.loss_reduction,
            generator=built.generator,
            secure_mode=built.secure_mode,
        )
