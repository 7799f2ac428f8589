"""The empirical Fisher information of each output row of a layer's weight, for FWSVD.

FWSVD (Hsu et al. 2022) weights the rows of a weight by how much the loss depends on them before
factorising it: ``I_i = Σ_batches Σ_j (∂L/∂W_ij)²``, one value per output feature. Pass the result
as ``row_weights`` to :func:`sparsenets.formats.low_rank.truncated_svd` or
:meth:`~sparsenets.formats.low_rank.LowRankLinear.from_dense`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import batches as B
from ..errors import ConfigError
from ..gemm import is_hf_conv1d
from ..integrations import distributed
from ..masking import parametrization_list

__all__ = ["fisher_rows"]


def _check_layers(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    if not layers:
        raise ConfigError("fisher_rows needs at least one layer")
    inside = {id(m) for m in model.modules()}
    for name, layer in layers.items():
        if not (isinstance(layer, nn.Linear) or is_hf_conv1d(layer)):
            raise ConfigError(f"layer '{name}' is a {type(layer).__name__}; fisher_rows takes nn.Linear "
                              f"and Hugging Face Conv1D layers")
        if id(layer) not in inside:
            raise ConfigError(f"layer '{name}' is not a module of the model")


@contextmanager
def _gradients_for(model: nn.Module, weights: list[Tensor]):
    """Only ``weights`` require grad inside (no graph kept for the rest); every flag comes back after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _leaf(layer: nn.Module) -> Tensor:
    """The stored weight: ``original`` under a parametrization (a mask), else the weight itself."""
    if parametrize.is_parametrized(layer, "weight"):
        return cast(Tensor, parametrization_list(layer, "weight").original)
    return cast(Tensor, layer.weight)


def _row_sums(layer: nn.Module, grad: Tensor) -> Tensor:
    # a Conv1D weight is (in, out): its output rows are columns
    return grad.square().sum(dim=0 if is_hf_conv1d(layer) else 1)


def fisher_rows(model: nn.Module, layers: dict[str, nn.Module], data: Iterable[Any],
                loss_fn: B.LossFn | None = None, batches: int | None = None) -> dict[str, Tensor]:
    """``{name: I}`` with ``I_i = Σ_batches Σ_j (∂L/∂W_ij)²`` for each output row ``i`` of each layer.

    ``layers`` maps names to ``nn.Linear`` or Hugging Face ``Conv1D`` modules of ``model`` (a
    ``Conv1D`` weight is stored ``in × out``; ``I`` is per output feature either way). ``data``
    yields ``(inputs, targets)`` tuples or dicts of keyword inputs (with ``labels``, a Hugging Face
    model returns its own loss); ``loss_fn`` and the default loss are as in
    :func:`sparsenets.batches.loss`. At most ``batches`` batches are used (all by default).

    A masked layer (``sparsenets.masking``) gets the Fisher of its masked weight as the forward
    uses it, gradients at pruned entries included: a factorisation changes those too.

    The model runs in its current train/eval mode (dropout stays on in train mode); gradients are
    taken for the layers' weights alone, with ``torch.autograd.grad``, so no ``.grad`` is left on
    the model and every ``requires_grad`` flag is restored. Under ``torch.distributed`` the sums
    run over every rank's batches. Values are float32 (float64 for float64 weights).
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ConfigError(f"batches must be an integer >= 1 or None, got {batches!r}")
    _check_layers(model, layers)
    calibration = B.take(data, batches)
    if not calibration:
        raise ConfigError("fisher_rows needs calibration data, got none")
    leaves = [_leaf(layer) for layer in layers.values()]
    totals = [torch.zeros(w.shape[1] if is_hf_conv1d(layer) else w.shape[0], device=w.device,
                          dtype=torch.promote_types(w.dtype, torch.float32))
              for layer, w in zip(layers.values(), leaves)]
    with _gradients_for(model, leaves), torch.enable_grad():
        for batch in calibration:
            # the weights the forward uses (a masked one computed once, by parametrize's cache), so
            # that a masked layer's Fisher is that of its effective weight, pruned entries included
            with parametrize.cached():
                used = [cast(Tensor, layer.weight) for layer in layers.values()]
                loss = B.loss(model, batch, loss_fn)
            grads = torch.autograd.grad(loss, used, allow_unused=True)
            for total, layer, grad in zip(totals, layers.values(), grads):
                if grad is not None:  # a layer the loss does not reach has zero Fisher
                    total += _row_sums(layer, grad.detach().to(total.dtype))
    distributed.all_reduce_sum_(totals)  # dict order, hence tensor order, is the same on every rank
    return dict(zip(layers, totals))
