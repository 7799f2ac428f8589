"""Targets: the weights a config sparsifies, found on any ``nn.Module`` without touching its code.

A *unit* is what one sparsity level applies to: usually one weight (plus its bias for
whole-output patterns), or, for the head pattern, every projection of one attention
module. Each member of a unit carries a map from its elements to the unit's groups, so
scoring, selecting and expanding masks is the same code for every pattern.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .gemm import from_gemm, is_hf_conv1d, to_gemm
from .patterns import Pattern

# Layer kinds we can sparsify, by class name (matched anywhere in the MRO, so subclasses count).
MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Embedding", "MultiheadAttention",
                "LSTM", "GRU", "RNN")
DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention", "LSTM", "GRU", "RNN")


def class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


_RECURRENT = {"LSTM", "GRU", "RNN"}


def is_layer(module: nn.Module, types: tuple[str, ...] | set[str] = MODULE_TYPES) -> bool:
    """Whether ``module`` is one of the layer kinds ``types`` (names common enough that a user's
    own model class may carry them, like ``RNN``, count only on torch's recurrent layers)."""
    names = class_names(module) & set(types)
    if not isinstance(module, nn.RNNBase):
        names -= _RECURRENT
    return bool(names)



def weight_names(module: nn.Module) -> list[str]:
    """The weight parameters of a supported layer, in GEMM form order."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, nn.RNNBase):  # weight_ih_l0, weight_hh_l0, ..., gates stacked as rows
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    return ["weight"]



@dataclass
class Member:
    """One tensor of a unit: ``module.<param>``, with its elements' group ids in GEMM form."""

    module_name: str
    param: str
    module: nn.Module
    group_ids: Tensor | None  # None for patterns that select locally (N:M)
    is_weight: bool = True  # weights are scored and counted; biases follow their groups

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)

    @property
    def ids(self) -> Tensor:
        """``group_ids``, for a pattern that has groups."""
        assert self.group_ids is not None, f"{self.qualname}: its pattern selects locally and has no groups"
        return self.group_ids


@dataclass
class Unit:
    name: str
    pattern: Pattern
    members: list[Member]
    n_groups: int
    erk_dims: list[tuple[int, ...]] = field(default_factory=list)
    sparsity: float | None = None  # fixed per-layer sparsity (override or N:M); None = allocated

    @property
    def weights(self) -> list[Member]:
        return [m for m in self.members if m.is_weight]

    @property
    def numel(self) -> int:
        return sum(m.tensor().numel() for m in self.weights)

    def group_sizes(self) -> Tensor:
        sizes = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            sizes.index_add_(0, m.ids.reshape(-1), torch.ones(m.ids.numel(), dtype=torch.float64))
        return sizes

    def group_scores(self, scores: dict[str, Tensor]) -> Tensor:
        """Mean element score of each group (means keep edge blocks comparable to full ones)."""
        total = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            gemm = to_gemm(m.module, scores[m.qualname]).to(torch.float64)
            total.index_add_(0, m.ids.reshape(-1), gemm.reshape(-1))
        return total / self.group_sizes()

    def live_groups(self, scores: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(mean score, element count) of each group over its live elements, those not scored −inf
        (already pruned). A group with nothing live scores −inf and counts 0."""
        total = torch.zeros(self.n_groups, dtype=torch.float64)
        live = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            gemm = to_gemm(m.module, scores[m.qualname]).to(torch.float64).reshape(-1).cpu()
            alive = gemm != float("-inf")
            ids = m.ids.reshape(-1)
            total.index_add_(0, ids, torch.where(alive, gemm, 0.0))
            live.index_add_(0, ids, alive.to(torch.float64))
        means = torch.where(live > 0, total / live.clamp(min=1), float("-inf"))
        return means, live

    def conforms(self, masks: dict[str, Tensor]) -> bool:
        """Whether the weight masks have the unit's pattern's structure (each group all or nothing)."""
        if self.pattern.selects_locally:
            return all(self.pattern.conforms(to_gemm(m.module, masks[m.qualname])) for m in self.weights)
        kept = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            mask = to_gemm(m.module, masks[m.qualname]).reshape(-1).cpu()
            kept.index_add_(0, m.ids.reshape(-1), mask.to(torch.float64))
        return bool(((kept == 0) | (kept == self.group_sizes())).all())

    def expand(self, keep: Tensor) -> dict[str, Tensor]:
        """Turn a per-group keep vector into element masks for every member."""
        masks = {}
        for m in self.members:
            shape = m.tensor().shape
            masks[m.qualname] = from_gemm(m.module, keep[m.group_ids], shape) if m.is_weight else keep[m.group_ids]
        return masks


def _layer_unit(name: str, module: nn.Module, pattern: Pattern) -> Unit:
    members, dims = [], []
    n_groups = 0
    for param in weight_names(module):
        weight = getattr(module, param)
        rows, cols = to_gemm(module, weight).shape
        pattern.check(rows, cols, name)
        if pattern.selects_locally:
            ids = None
        else:
            ids, n = pattern.group_ids(rows, cols)
            ids, n_groups = ids + n_groups, n_groups + n
        members.append(Member(name, param, module, ids))
        dims.append((weight.shape[0], *weight.shape[1:]) if not is_hf_conv1d(module) else (cols, rows))
    bias_name = "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"
    # recurrent biases stay dense: masking them would need a unit's ih and hh rows pruned together
    if pattern.masks_bias and not isinstance(module, nn.RNNBase) and getattr(module, bias_name, None) is not None:
        # the bias stacks the outputs of every weight (q|k|v for attention), row groups in order
        bias_ids = torch.cat([m.ids[:, 0] for m in members])
        members.append(Member(name, bias_name, module, bias_ids, is_weight=False))
    return Unit(name, pattern, members, n_groups, dims)


# ---- attention modules for the head pattern -------------------------------------------------


def _head_rows(rows: int, head_dim: int, heads: int) -> Tensor:
    """Head id of each output row of a projection that stacks [q; k; v] (or just one of them)."""
    return (torch.arange(rows) % (heads * head_dim)) // head_dim


def _attention_layout(module: nn.Module) -> tuple[int, int, list[tuple[nn.Module, str, str]]] | None:
    """(heads, head_dim, [(module, param, 'rows'|'cols'|'bias')]) for a known attention module."""
    if isinstance(module, nn.MultiheadAttention):
        heads, head_dim = module.num_heads, module.head_dim
        parts: list[tuple[nn.Module, str, str]]
        if module._qkv_same_embed_dim:
            parts = [(module, "in_proj_weight", "rows")]
        else:
            parts = [(module, p, "rows") for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
        if module.in_proj_bias is not None:
            parts.append((module, "in_proj_bias", "bias"))
        return heads, head_dim, parts + [(module.out_proj, "weight", "cols")]
    hf: Any = module  # Hugging Face attention, recognised by its attributes
    self_attn: Any = getattr(hf, "self", None)
    output: Any = getattr(hf, "output", None)
    if self_attn is not None and hasattr(self_attn, "num_attention_heads") and hasattr(output, "dense"):
        # BERT-style: attention.self.{query,key,value} and attention.output.dense
        heads, head_dim = self_attn.num_attention_heads, self_attn.attention_head_size
        parts = []
        for proj in (self_attn.query, self_attn.key, self_attn.value):
            parts.append((proj, "weight", "rows"))
            if proj.bias is not None:
                parts.append((proj, "bias", "bias"))
        return heads, head_dim, parts + [(output.dense, "weight", "cols")]
    if hasattr(hf, "c_attn") and hasattr(hf, "c_proj") and hasattr(hf, "num_heads"):
        if getattr(hf, "is_cross_attention", False):
            return None
        # GPT-2-style: c_attn stacks [q; k; v] (HF Conv1D), c_proj mixes the heads back
        parts = [(hf.c_attn, "weight", "rows")]
        if hf.c_attn.bias is not None:
            parts.append((hf.c_attn, "bias", "bias"))
        return hf.num_heads, hf.head_dim, parts + [(hf.c_proj, "weight", "cols")]
    return None


def _head_unit(name: str, module: nn.Module, module_names: dict[nn.Module, str], pattern: Pattern) -> Unit:
    layout = _attention_layout(module)
    assert layout is not None, f"{name} is not an attention module"
    heads, head_dim, parts = layout
    members: list[Member] = []
    dims: list[tuple[int, ...]] = []
    for sub, param, role in parts:
        tensor = getattr(sub, param)
        if role == "bias":
            ids = _head_rows(tensor.shape[0], head_dim, heads)
        else:
            rows, cols = to_gemm(sub, tensor).shape
            if role == "rows":
                ids = _head_rows(rows, head_dim, heads)[:, None].expand(rows, cols)
            else:
                ids = (torch.arange(cols) // head_dim)[None, :].expand(rows, cols)
            dims.append((rows, cols))
        members.append(Member(module_names[sub], param, sub, ids, is_weight=role != "bias"))
    return Unit(name, pattern, members, heads, dims)


# ---- selection from a config -----------------------------------------------------------------


def name_matches(name: str, patterns: list[str]) -> bool:
    """A glob matches a module name or any of its ancestors ("encoder" covers "encoder.layer.0")."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def find_units(model: nn.Module, config) -> list[Unit]:
    """The units ``config`` selects on ``model``, in registration order; raises on bad input."""
    named = [(n, m) for n, m in model.named_modules()]
    names = [n for n, _ in named if n]
    for pat in (config.include or []) + list(config.overrides):
        if not any(name_matches(n, [pat]) for n in names):
            raise ConfigError(f"glob {pat!r} matches no module name; module names look like: "
                              f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    types = set(config.module_types or DEFAULT_MODULE_TYPES)

    def selected(name: str) -> bool:
        if config.include and not name_matches(name, config.include):
            return False
        return not name_matches(name, config.exclude)

    if config.pattern.scope == "attention":
        module_names = {m: n for n, m in named}
        units = [_head_unit(n, m, module_names, config.pattern) for n, m in named
                 if _attention_layout(m) is not None and selected(n)]
        if not units:
            raise ConfigError(f"pattern '{config.pattern}' found no attention module to prune (supported: "
                              "nn.MultiheadAttention, BERT- and GPT-2-style attention)")
    else:
        units = []
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for name, module in named:
            if not is_layer(module, types) or not selected(name):  # the root counts too: a bare nn.Linear
                continue
            if any(uses[id(getattr(module, w))] > 1 for w in weight_names(module)):
                # a tied weight (GPT-2's lm_head is the token embedding): masking one user of it
                # would zero the other's weights behind its back
                warnings.warn(f"layer '{name}' shares its weight with another module; left dense", stacklevel=3)
                continue
            pattern = config.pattern_for(name)
            if pattern is None:  # an override that keeps this layer dense
                continue
            units.append(_layer_unit(name, module, pattern))
        if not units:
            raise ConfigError(f"no layer to sparsify: nothing of type {sorted(types)} "
                              f"passes include={config.include} exclude={config.exclude}")
    if config.keep_first_last_dense:
        if len(units) <= 2:
            raise ConfigError(f"keep_first_last_dense leaves nothing to sparsify: only {len(units)} layer(s) match")
        units = units[1:-1]
    for unit in units:
        unit.sparsity = config.sparsity_for(unit.name, unit.pattern)
    return units
