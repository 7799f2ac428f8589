"""What sparse training rewires, in its two modes: a unit's groups under masks, or a block-sparse
layer's blocks.

- ``"masked"`` (the research mode): any layer and any pattern that can be rewired; a weight stays
  a dense tensor under a mask and the compute is dense.
- ``"fast"``: ``block:RxC`` weights of ``nn.Linear`` (and Hugging Face ``Conv1D``), ``nn.Conv1d``
  and ``nn.Conv2d`` layers become block-sparse layers (:class:`~sparsenets.layers.BlockSparseLinear`,
  ``BlockSparseConv1d``/``2d``), which store, compute and train only their kept blocks; rewiring
  moves blocks in place. Other layers stay masked.

Both show the methods the same thing: each group's size, which groups are active, their mean
|w|, RigL's growth scores (the mean square of the dense gradient over the group), and a move to
a new set of active groups that zeroes what leaves and what joins, optimizer state included.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..config import SparsityConfig
from ..errors import ConfigError
from ..gemm import block_sizes, is_hf_conv1d, n_blocks, to_gemm
from ..integrations import distributed
from ..kernels.block_norms import block_gradient_norms, matrix_block_norms
from ..layers.block_sparse import BlockSparseConv1d, BlockSparseConv2d, BlockSparseLinear, remap_blocks_
from ..masking import Mask, get_mask, parametrization_list
from ..targets import Unit

MODES = ("masked", "fast")
BlockSparseLayer = BlockSparseLinear | BlockSparseConv1d | BlockSparseConv2d
_CONVERSIONS: dict[type[nn.Module], type[BlockSparseConv1d | BlockSparseConv2d]] = {
    nn.Conv1d: BlockSparseConv1d, nn.Conv2d: BlockSparseConv2d}


def _mask(module: nn.Module, name: str) -> Mask:
    """The mask on ``module.<name>``, which the method put on every weight it rewires."""
    mask = get_mask(module, name)
    if mask is None:
        raise RuntimeError(f"{type(module).__name__}.{name} has no mask to rewire (was it finalized?)")
    return mask


def _missing_gradient(name: str) -> RuntimeError:
    return RuntimeError(f"RigL found no dense gradient for {name}: call on_train_begin(model, optimizer) "
                        f"before training and step(step) after every optimizer step, and run forward and "
                        f"backward in between (a model run through torch.compile skips the hooks that "
                        f"collect it: train RigL uncompiled, or use SET)")


class MaskedGroups:
    """A unit's groups, as masks on its weights."""

    def __init__(self, unit: Unit) -> None:
        self.unit, self.name, self.n_groups = unit, unit.name, unit.n_groups
        self.dense_grads: dict[str, Tensor] = {}

    def sizes(self) -> Tensor:
        return self.unit.group_sizes()

    def active(self) -> Tensor:
        masks = {m.qualname: _mask(m.module, m.param).mask.cpu() for m in self.unit.weights}
        return self.unit.group_scores(masks) > 0.5

    def magnitudes(self) -> Tensor:
        return self.unit.group_scores({m.qualname: distributed.full(m.tensor()).abs().cpu() for m in self.unit.weights})

    def move(self, active: Tensor, optimizer: Any) -> int:
        """Make ``active`` the active groups; returns the number of weights grown."""
        masks = self.unit.expand(active)  # group scores live on the CPU; _apply moves masks to the weights
        return sum(self._apply(m.module, m.param, masks[m.qualname], optimizer) for m in self.unit.weights)

    @staticmethod
    def _apply(module: nn.Module, name: str, new_mask: Tensor, optimizer: Any) -> int:
        mask = _mask(module, name)
        original = parametrization_list(module, name).original
        new_mask = new_mask.to(mask.mask.device)
        changed = new_mask ^ mask.mask
        grown = int((new_mask & ~mask.mask).sum())
        mask.mask.copy_(new_mask)
        original.masked_fill_(distributed.like(changed, original), 0.0)  # like: this rank's shard under FSDP
        if optimizer is not None:  # what joins starts afresh; what leaves keeps no momentum to move it
            for value in optimizer.state.get(original, {}).values():
                if isinstance(value, Tensor) and value.shape == original.shape:
                    value.masked_fill_(distributed.like(changed, value), 0.0)
        return grown

    # ---- RigL's dense gradient: the gradient w.r.t. the effective (masked) weight ------------------

    def capture_gradients(self) -> list[Any]:
        """Hooks that sum the dense gradients of the coming backward passes; returns their handles."""
        return [_mask(m.module, m.param).register_forward_hook(self._hook(m.qualname)) for m in self.unit.weights]

    def _hook(self, qualname: str):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(qualname, grad))
        return hook

    def _accumulate(self, qualname: str, grad: Tensor) -> None:
        previous = self.dense_grads.get(qualname)
        self.dense_grads[qualname] = grad.detach().clone() if previous is None else previous + grad.detach()

    def gradient_scores(self) -> Tensor:
        missing = [m.qualname for m in self.unit.weights if m.qualname not in self.dense_grads]
        if missing:
            raise _missing_gradient(", ".join(missing))
        grads = [self.dense_grads[m.qualname] for m in self.unit.weights]
        # DDP averages only the parameters' (masked) gradients; growth follows the whole batch
        distributed.all_reduce_sum_(grads)
        return self.unit.group_scores({m.qualname: g.square().cpu() for m, g in zip(self.unit.weights, grads)})

    def clear(self) -> None:
        self.dense_grads = {}


class BlockGroups:
    """The blocks of a block-sparse layer (GEMM form), in the row-major order of the pattern's groups."""

    def __init__(self, name: str, layer: BlockSparseLayer) -> None:
        self.name, self.layer = name, layer
        r, c = layer.block
        self.grid = (n_blocks(layer.out_features, r), n_blocks(layer.in_features, c))
        self.n_groups = self.grid[0] * self.grid[1]
        self.captured: list[tuple[Tensor, Tensor]] = []  # (input, output gradient) of each backward

    def _ids(self) -> Tensor:
        layout = self.layer.layout
        return (layout.row_idx * self.grid[1] + layout.col_idx).cpu()

    def sizes(self) -> Tensor:
        return block_sizes((self.layer.out_features, self.layer.in_features), self.layer.block).reshape(-1).double()

    def active(self) -> Tensor:
        active = torch.zeros(self.n_groups, dtype=torch.bool)
        active[self._ids()] = True
        return active

    def magnitudes(self) -> Tensor:
        sums = torch.zeros(self.n_groups, dtype=torch.float64)
        sums[self._ids()] = self.layer.values.detach().abs().double().sum((1, 2)).cpu()  # padding is zero
        return sums / self.sizes()

    def move(self, active: Tensor, optimizer: Any) -> int:
        if distributed.is_sharded(self.layer):
            raise RuntimeError(f"{self.name}: fast mode can't rewire a layer FSDP has sharded; train it "
                               f"with mode='masked'")
        grown = int(self.sizes()[active & ~self.active()].sum())
        source = self.layer.relayout_(active.view(self.grid))
        values = self.layer.values
        if optimizer is not None:
            for value in optimizer.state.get(values, {}).values():
                if isinstance(value, Tensor) and value.shape == values.shape:
                    remap_blocks_(value, source)
        return grown

    def capture_gradients(self) -> list[Any]:
        return [self.layer.register_forward_hook(self._hook)]

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda grad: self.captured.append((x, grad.detach())))

    def gradient_scores(self) -> Tensor:
        if not self.captured:
            raise _missing_gradient(f"{self.name}.values")
        layer = self.layer
        if isinstance(layer, BlockSparseLinear) and not distributed.active():  # from X and dY, block by block
            x = torch.cat([x.reshape(-1, layer.in_features) for x, _ in self.captured])
            dy = torch.cat([g.reshape(-1, layer.out_features) for _, g in self.captured])
            return block_gradient_norms(dy, x, layer.block).reshape(-1).cpu() / self.sizes()
        # a convolution's, or one summed over ranks (the norm of a sum needs the sum): the dense gradient
        gradient = torch.stack([self._dense_gradient(x, g) for x, g in self.captured]).sum(0)
        distributed.all_reduce_sum_([gradient])
        return matrix_block_norms(gradient, layer.block).reshape(-1).cpu() / self.sizes()

    def _dense_gradient(self, x: Tensor, grad_out: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, BlockSparseLinear):
            return grad_out.reshape(-1, layer.out_features).T.float() @ x.reshape(-1, layer.in_features).float()
        return layer.gemm_gradient(x.float(), grad_out.float())

    def clear(self) -> None:
        self.captured = []


def _fast_layer(module: nn.Module) -> bool:
    """Whether a layer can train as a :class:`BlockSparseLinear`: its class adds nothing to the
    product, nothing but the mask parametrizes it, and no hook of the user's watches it (a
    replacement would drop them)."""
    cls = _layer_class(module)
    alone = (list(cast(nn.ModuleDict, module.parametrizations)) == ["weight"]
             and len(parametrization_list(module, "weight")) == 1)
    hooked = any((module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                  module._backward_pre_hooks, module._state_dict_hooks, module._load_state_dict_pre_hooks))
    kind = cls is nn.Linear or is_hf_conv1d(module) or (cls in _CONVERSIONS and getattr(module, "groups", 1) == 1)
    return kind and alone and not hooked


def _layer_class(module: nn.Module) -> type:
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)  # parametrize subclasses


def _to_block_sparse(module: nn.Module, block: tuple[int, int]) -> BlockSparseLayer:
    weight, mask = cast(Tensor, module.weight).detach(), _mask(module, "weight").mask
    bias = None if module.bias is None else cast(Tensor, module.bias).detach()
    # the layer starts from a random init (then overwritten): keep it off the caller's RNG, so both modes train alike
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        conv = _CONVERSIONS.get(_layer_class(module))
        layer: BlockSparseLayer
        if conv is not None:
            layer = conv.from_dense(cast(nn.Conv2d, module), weight, mask, block)
        else:
            layer = BlockSparseLinear.from_dense(to_gemm(module, weight), to_gemm(module, mask), bias, block)
    layer.values.requires_grad_(parametrization_list(module, "weight").original.requires_grad)
    return layer.train(module.training)


def check_mode(mode: str, config: SparsityConfig) -> None:
    """Refuse a mode the config can't train in, before anything is masked."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "fast" and config.target_pattern.block_shape is None:
        raise ConfigError(f"fast mode trains block-sparse layers: it needs a block:RxC pattern, "
                          f"got {str(config.target_pattern)!r}")


def rewirable_groups(model: nn.Module, units: list[Unit], mode: str) -> list[MaskedGroups | BlockGroups]:
    """The groups of each unit in ``mode``; in fast mode, block-sparse layers replace the masked ones, in place."""
    if mode == "masked":
        return [MaskedGroups(unit) for unit in units]
    groups: list[MaskedGroups | BlockGroups] = []
    stay_masked = []
    for unit in units:
        block, module = unit.pattern.block_shape, unit.members[0].module
        if block is None or not unit.name or not _fast_layer(module) or len(unit.members) != 1:
            stay_masked.append(unit.name or type(module).__name__)
            groups.append(MaskedGroups(unit))
            continue
        layer = _to_block_sparse(module, block)
        model.set_submodule(unit.name, layer)
        groups.append(BlockGroups(unit.name, layer))
    if stay_masked:
        warnings.warn(f"fast mode: {', '.join(stay_masked)} stay masked (only plain Linear, Conv1D, Conv1d "
                      f"and Conv2d layers with a block pattern and no hooks become block-sparse)", stacklevel=3)
    return groups
