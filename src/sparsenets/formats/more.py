"""MoRe adapters (Monarch Rectangular fine-tuning, Tan et al. 2024): a frozen layer plus a Monarch update.

``y = base(x) + scale · Monarch(dropout(x))``, where the Monarch product has ``nblocks`` blocks
of rank ``block_rank``. It costs ``block_rank · (in + out)`` parameters, what LoRA pays at rank
``block_rank``, but its update can reach rank ``nblocks · block_rank``. Like LoRA's ``B = 0``,
the second factor starts at zero, so an adapted model starts as the model it adapts.

``add_more_(model, MoReConfig(...))`` wraps the selected ``nn.Linear`` / Hugging Face
``Conv1D`` layers in place and freezes everything but the adapters; ``merge_more_`` folds each
update into its base weight and puts the plain layer back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gemm import is_hf_conv1d
from ..targets import name_matches
from .monarch import MonarchLinear


class MoReLinear(nn.Module):
    """``base`` (frozen) plus a Monarch-rectangular update ``adapter`` scaled by ``scale``.

    ``base`` is the layer to adapt, or its description (``{"class", "init"}`` as
    :func:`sparsenets.io.architecture.describe_layer` writes it) when rebuilt from a checkpoint.
    """

    def __init__(self, base: nn.Module | dict[str, Any], nblocks: int = 4, block_rank: int = 1,
                 scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, dict):
            from ..io.architecture import build_described

            base = build_described(base)
        if not (isinstance(base, nn.Linear) or is_hf_conv1d(base)):
            raise ConfigError(f"MoRe adapts nn.Linear and Hugging Face Conv1D layers, not {type(base).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout!r}: must be in [0, 1)")
        weight = cast(Tensor, base.weight)
        out_features, in_features = weight.shape[::-1] if is_hf_conv1d(base) else weight.shape
        self.base = base.requires_grad_(False)
        self.adapter = MonarchLinear(in_features, out_features, nblocks, block_rank, bias=False,
                                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.adapter.blocks2.zero_()  # the adapted model starts as the base model
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.adapter.in_features

    @property
    def out_features(self) -> int:
        return self.adapter.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.adapter(self.dropout(x))

    def delta_weight(self) -> Tensor:
        """The update the adapter adds, as an (out, in) matrix."""
        return self.scale * self.adapter.dense_weight()

    def dense_weight(self) -> Tensor:
        """The base weight plus the update, (out, in): what :meth:`merge` writes."""
        base = cast(Tensor, self.base.weight)
        return (base.t() if is_hf_conv1d(self.base) else base) + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The base layer with the update folded into its weight (the adapter is dropped)."""
        weight = cast(Tensor, self.base.weight)
        delta = self.delta_weight().to(weight.dtype)
        weight.add_(delta.t() if is_hf_conv1d(self.base) else delta)
        return self.base

    def format_name(self) -> str:
        return f"more:{self.adapter.nblocks}x{self.adapter.block_rank}"

    def num_parameters(self) -> int:
        """Stored weights: the base layer's plus the adapter's factors."""
        return cast(Tensor, self.base.weight).numel() + self.adapter.num_parameters()

    def init_args(self) -> dict[str, Any]:
        from ..io.architecture import describe_layer

        return {"base": describe_layer(self.base), "nblocks": self.adapter.nblocks,
                "block_rank": self.adapter.block_rank, "scale": self.scale,
                "dropout": getattr(self.dropout, "p", 0.0)}

    def extra_repr(self) -> str:
        return f"nblocks={self.adapter.nblocks}, block_rank={self.adapter.block_rank}, scale={self.scale:g}"


@dataclass
class MoReConfig:
    """Which layers get MoRe adapters, and their shape.

    Args:
        nblocks: Monarch blocks of each update (its rank can reach ``nblocks · block_rank``).
        block_rank: rank of each block; parameters per layer are ``block_rank · (in + out)``.
        scale: multiplies the update (LoRA's ``alpha / r``).
        dropout: dropout on the adapter's input (not the base layer's).
        include / exclude: globs on module names (a glob covers a module's children); by
            default every Linear / Conv1D except an output head named ``lm_head``.
        freeze: freeze every parameter that is not an adapter's, as PEFT does.
    """

    nblocks: int = 4
    block_rank: int = 1
    scale: float = 1.0
    dropout: float = 0.0
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    freeze: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoReConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown MoRe keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def __post_init__(self) -> None:
        for key in ("nblocks", "block_rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r}: must be an integer >= 1")


def adaptable_layers(model: nn.Module, include: list[str] | None, exclude: list[str]) -> list[str]:
    """Names of the Linear / Conv1D layers the globs select (adapters never nest)."""
    inside_adapter = {id(m) for a in model.modules() if isinstance(a, MoReLinear) for m in a.modules()}
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_hf_conv1d(m)) and id(m) not in inside_adapter
            and (include is None or name_matches(name, include)) and not name_matches(name, exclude)]


def add_more_(model: nn.Module, config: MoReConfig | dict | None = None) -> nn.Module:
    """Wrap the layers ``config`` selects in :class:`MoReLinear`, in place; returns ``model``."""
    config = MoReConfig.from_dict(config) if isinstance(config, dict) else config or MoReConfig()
    names = adaptable_layers(model, config.include, config.exclude)
    if not names:
        raise ConfigError(f"no Linear or Conv1D layer matches include={config.include} exclude={config.exclude}")
    wrapped = {}
    for name in names:  # build all before replacing any: an error leaves the model as it was
        base = model.get_submodule(name)
        wrapped[name] = MoReLinear(base, config.nblocks, config.block_rank, config.scale, config.dropout)
        wrapped[name].train(base.training)
    if config.freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, layer in wrapped.items():
        layer.adapter.requires_grad_(True)
        if not name:
            return layer
        model.set_submodule(name, layer)
    return model


def merge_more_(model: nn.Module) -> nn.Module:
    """Fold every MoRe update into its base weight and put the plain layer back, in place."""
    if isinstance(model, MoReLinear):
        return model.merge()
    for name, module in list(model.named_modules()):
        if isinstance(module, MoReLinear):
            model.set_submodule(name, module.merge())
    return model


__all__ = ["MoReConfig", "MoReLinear", "adaptable_layers", "add_more_", "merge_more_"]
