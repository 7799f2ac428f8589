"""Targets: the weights a config sparsifies, found on any ``nn.Module`` without touching its code.

A *unit* is what one sparsity level applies to: usually one weight (plus its bias for
whole-output patterns), or, for the head pattern, every projection of one attention
module. A mixture-of-experts bank's 3-D parameter is one unit whose groups never span two
experts, and its sparsity holds in every expert. Each member of a unit carries a map from its
elements to the unit's groups, so scoring, selecting and expanding masks is the same code for
every pattern.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .gemm import block_sizes, block_sums, expert_weight_names, from_gemm, is_experts, is_hf_conv1d, n_blocks, to_gemm
from .patterns import Pattern

# Layer kinds we can sparsify, by class name (matched anywhere in the MRO, so subclasses count).
# "Experts" is not a class name: it stands for any mixture-of-experts bank (see gemm.is_experts).
MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Embedding", "MultiheadAttention",
                "LSTM", "GRU", "RNN", "Experts")
DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention", "LSTM", "GRU", "RNN",
                        "Experts")


def class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


_RECURRENT = {"LSTM", "GRU", "RNN"}


def is_layer(module: nn.Module, types: tuple[str, ...] | set[str] = MODULE_TYPES) -> bool:
    """Whether ``module`` is one of the layer kinds ``types`` (names common enough that a user's
    own model class may carry them, like ``RNN``, count only on torch's recurrent layers)."""
    names = class_names(module) & set(types)
    if not isinstance(module, nn.RNNBase):
        names -= _RECURRENT
    return bool(names) or ("Experts" in types and is_experts(module))


def routers(model: nn.Module) -> set[nn.Module]:
    """The routers of the mixture-of-experts blocks in ``model`` (``block.gate`` or ``block.router``
    next to ``block.experts``): kept dense, since a pruned router row silences a whole expert."""
    found = set()
    for block in model.modules():
        if is_experts(getattr(block, "experts", None)):
            gates = ("gate", "router", "shared_expert_gate")  # Qwen-MoE also gates its shared expert
            found |= {r for r in (getattr(block, g, None) for g in gates) if isinstance(r, nn.Module)}
    return found



def weight_names(module: nn.Module) -> list[str]:
    """The weight parameters of a supported layer, in GEMM form order."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, nn.RNNBase):  # weight_ih_l0, weight_hh_l0, ..., gates stacked as rows
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    return expert_weight_names(module) or ["weight"]



@dataclass
class Member:
    """One tensor of a unit: ``module.<param>``, with its elements' group ids in GEMM form."""

    module_name: str
    param: str
    module: nn.Module
    group_ids: Tensor | None  # None for patterns that select locally (N:M), and when made on demand
    is_weight: bool = True  # weights are scored and counted; biases follow their groups
    # (pattern, offset) when the ids are never stored: offset + the pattern's group ids, made on demand
    made_from: tuple[Pattern, int] | None = None

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)

    @property
    def ids(self) -> Tensor:
        """``group_ids``, for a pattern that has groups. Ids are one int64 per element, as many as
        the weights themselves: for entries and blocks they are made when asked for (which the
        usual paths avoid) rather than held for every layer."""
        if self.group_ids is None and self.made_from is not None:
            pattern, offset = self.made_from
            rows, cols = to_gemm(self.module, self.tensor()).shape
            return pattern.group_ids(rows, cols)[0] + offset
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
    # an expert bank's groups by expert: a unit's sparsity then holds in each expert, not just on average
    expert_of_group: Tensor | None = None

    @property
    def weights(self) -> list[Member]:
        return [m for m in self.members if m.is_weight]

    @property
    def numel(self) -> int:
        return sum(m.tensor().numel() for m in self.weights)

    def _grid(self) -> tuple[Member, tuple[int, int]] | None:
        """The one weight of a unit whose groups are a plain grid of its entries or blocks, in
        row-major order (most units), and the grid's block (1 × 1 for entries): sums over its
        groups then need no index of every entry."""
        weights, block = self.weights, self.pattern.block_shape
        if len(self.members) != 1 or self.expert_of_group is not None or self.pattern.selects_locally:
            return None
        if self.pattern.elementwise:
            return weights[0], (1, 1)
        return None if block is None else (weights[0], block)

    def group_sizes(self) -> Tensor:
        if (grid := self._grid()) is not None:
            member, block = grid
            shape = tuple(to_gemm(member.module, member.tensor()).shape)
            return block_sizes((shape[0], shape[1]), block).reshape(-1).double()
        sizes = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            sizes.index_add_(0, m.ids.reshape(-1), torch.ones(m.ids.numel(), dtype=torch.float64))
        return sizes

    def group_scores(self, scores: dict[str, Tensor]) -> Tensor:
        """Mean element score of each group (means keep edge blocks comparable to full ones)."""
        if (grid := self._grid()) is not None:
            member, block = grid
            gemm = to_gemm(member.module, scores[member.qualname])
            if block == (1, 1):
                return gemm.reshape(-1).to("cpu", torch.float64)
            return block_sums(gemm, block, torch.float64).reshape(-1).cpu() / self.group_sizes()
        total = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            gemm = to_gemm(m.module, scores[m.qualname]).to(torch.float64)
            total.index_add_(0, m.ids.reshape(-1), gemm.reshape(-1))
        return total / self.group_sizes()

    def live_groups(self, scores: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(mean score, element count) of each group over its live elements, those not scored −inf
        (already pruned). A group with nothing live scores −inf and counts 0."""
        if (grid := self._grid()) is not None:
            member, block = grid
            gemm = to_gemm(member.module, scores[member.qualname]).to("cpu", torch.float64)
            alive = gemm != float("-inf")
            total, live = (block_sums(t, block).reshape(-1) for t in (torch.where(alive, gemm, 0.0), alive.double()))
            return torch.where(live > 0, total / live.clamp(min=1), float("-inf")), live
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
        if self.pattern.elementwise:
            return True
        if self.pattern.selects_locally:
            return all(self.pattern.conforms(to_gemm(m.module, masks[m.qualname])) for m in self.weights)
        if (grid := self._grid()) is not None:
            member, block = grid
            mask = to_gemm(member.module, masks[member.qualname]).to("cpu", torch.float64)
            kept = block_sums(mask, block).reshape(-1)
            return bool(((kept == 0) | (kept == self.group_sizes())).all())
        kept = torch.zeros(self.n_groups, dtype=torch.float64)
        for m in self.weights:
            mask = to_gemm(m.module, masks[m.qualname]).reshape(-1).cpu()
            kept.index_add_(0, m.ids.reshape(-1), mask.to(torch.float64))
        return bool(((kept == 0) | (kept == self.group_sizes())).all())

    def expand(self, keep: Tensor) -> dict[str, Tensor]:
        """Turn a per-group keep vector into element masks for every member."""
        if (grid := self._grid()) is not None:  # blocks repeated into place, no index of every entry
            member, (r, c) = grid
            rows, cols = to_gemm(member.module, member.tensor()).shape
            grid_keep = keep.view(n_blocks(rows, r), n_blocks(cols, c))
            gemm = grid_keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
            return {member.qualname: from_gemm(member.module, gemm, member.tensor().shape)}
        masks = {}
        for m in self.members:
            shape = m.tensor().shape
            masks[m.qualname] = from_gemm(m.module, keep[m.ids], shape) if m.is_weight else keep[m.ids]
        return masks


def _layer_unit(name: str, module: nn.Module, pattern: Pattern) -> Unit:
    members: list[Member] = []
    dims: list[tuple[int, ...]] = []
    n_groups = 0
    owners: list[Tensor] = []  # for an expert bank: the expert each group belongs to
    for param in weight_names(module):
        weight = getattr(module, param)
        experts = weight.shape[0] if weight.dim() == 3 and is_experts(module) else 1
        rows, cols = to_gemm(module, weight).shape
        rows //= experts  # an expert bank stacks its experts' GEMM forms; groups never span two experts
        pattern.check(rows, cols, name)
        made_from = None
        if pattern.selects_locally:
            ids = None
        elif experts == 1 and not is_experts(module) and (pattern.elementwise or pattern.block_shape is not None):
            ids, made_from = None, (pattern, n_groups)
            r, c = pattern.block_shape or (1, 1)
            n_groups += n_blocks(rows, r) * n_blocks(cols, c)
        else:
            ids, n = pattern.group_ids(rows, cols)
            ids = torch.cat([ids + n_groups + e * n for e in range(experts)])
            n_groups += experts * n
            owners.append(torch.arange(experts).repeat_interleave(n))
        members.append(Member(name, param, module, ids, made_from=made_from))
        if experts > 1:
            dims += [(rows, cols)] * experts
        else:
            dims.append((weight.shape[0], *weight.shape[1:]) if not is_hf_conv1d(module) else (cols, rows))
    bias_name = "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"
    # recurrent biases stay dense: masking them would need a unit's ih and hh rows pruned together
    if pattern.masks_bias and not isinstance(module, nn.RNNBase) and getattr(module, bias_name, None) is not None:
        # the bias stacks the outputs of every weight (q|k|v for attention), row groups in order
        bias_ids = torch.cat([m.ids[:, 0] for m in members])
        members.append(Member(name, bias_name, module, bias_ids, is_weight=False))
    experts_of = torch.cat(owners) if is_experts(module) and owners else None
    return Unit(name, pattern, members, n_groups, dims, expert_of_group=experts_of)


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
        from .attention import attention_layout, head_unit  # attention builds on Unit: imported late

        module_names = {m: n for n, m in named}
        units = [head_unit(n, m, module_names, config.pattern) for n, m in named
                 if attention_layout(m) is not None and selected(n)]
        if not units:
            raise ConfigError(f"pattern '{config.pattern}' found no attention module to prune (supported: "
                              "nn.MultiheadAttention, BERT- and GPT-2-style attention, separate q/k/v/o projections)")
    else:
        units = []
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        dense = routers(model)
        for name, module in named:
            if not is_layer(module, types) or not selected(name) or module in dense:  # the root counts too
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


# ---- what a selection leaves out ---------------------------------------------------------------


@dataclass
class Uncovered:
    """Parameters no mask reaches, grouped by name with layer indices as ``*``."""

    name: str
    reason: str
    numel: int
    count: int = 1
    ndim: int = 2


def stored_ids(units: list[Unit]) -> set[int]:
    """The storage of every member of ``units`` (under a mask, the parametrization's original)."""
    return {id(_stored(m.module, m.param)) for u in units for m in u.members}


def default_targets(model: nn.Module) -> set[int]:
    """The storage of every tensor a default config would mask (tied weights excluded)."""
    uses = Counter(id(_stored(m, p)) for m in model.modules() if is_layer(m) for p in weight_names(m))
    dense = routers(model)
    ids = set()
    for module in model.modules():
        if is_layer(module, DEFAULT_MODULE_TYPES) and module not in dense:
            stored = [id(_stored(module, p)) for p in weight_names(module)]
            if all(uses[i] == 1 for i in stored):
                ids.update(stored)
    return ids


def uncovered(model: nn.Module, covered: set[int]) -> list[Uncovered]:
    """Every parameter of ``model`` whose storage is not in ``covered``, with why, biggest first."""
    dense = routers(model)
    groups: dict[tuple[str, str], Uncovered] = {}
    for qualname, tensor in model.named_parameters():
        if id(tensor) in covered:
            continue
        module_name, param = _owner_and_param(qualname)
        module = model.get_submodule(module_name)
        name = _glob(model, f"{module_name}.{param}" if module_name else param)
        entry = groups.setdefault((name, _reason(module, tensor, dense)),
                                  Uncovered(name, _reason(module, tensor, dense), 0, 0, tensor.dim()))
        entry.numel += tensor.numel()
        entry.count += 1
    return sorted(groups.values(), key=lambda u: -u.numel)


def _reason(module: nn.Module, tensor: Tensor, dense: set[nn.Module]) -> str:
    if module in dense:
        return "routers are kept dense (a pruned router row silences a whole expert)"
    if tensor.dim() <= 1:
        return "1-D norm/bias parameters are not pruned"
    if is_layer(module, ("Embedding",)):
        return "embeddings are opt-in (module_types=['Embedding'])"
    if is_layer(module):
        return "left out: by the config's include/exclude/overrides, or a tied weight"
    return f"a parameter of {type(module).__name__}, not a layer type sparsenets prunes"


def _owner_and_param(qualname: str) -> tuple[str, str]:
    """('encoder.0', 'weight') for 'encoder.0.weight' or 'encoder.0.parametrizations.weight.original'."""
    if ".parametrizations." in f".{qualname}":
        head, _, tail = f".{qualname}".rpartition(".parametrizations.")
        return head.lstrip("."), tail.split(".")[0]
    module_name, _, param = qualname.rpartition(".")
    return module_name, param


def _glob(model: nn.Module, name: str) -> str:
    """Indices into a ModuleList (repeated blocks) as ``*``: one line for the same parameter of
    every block. Sequential indices stay: there each index is a different layer."""
    parts = name.split(".")
    return ".".join("*" if part.isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList)
                    else part for i, part in enumerate(parts))


def _stored(module: nn.Module, param: str) -> Tensor:
    """The tensor a weight is stored in (under a mask, the parametrization's original)."""
    if parametrize.is_parametrized(module, param):
        return cast(Tensor, cast(nn.ModuleDict, module.parametrizations)[param].original)
    return getattr(module, param)
