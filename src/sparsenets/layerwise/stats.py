"""What each layer's calibration inputs tell a criterion: the column norms (Wanda, OWL) or the
whole Gram matrix Σ xxᵀ (SparseGPT).

Layers fed the same tensor (q/k/v projections, gate and up) share one statistic: it is
accumulated once, which saves a Gram matrix and its cost per shared input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..criteria import _conv_patches, _input_sq
from ..errors import ConfigError
from ..gemm import is_hf_conv1d
from ..integrations import distributed


@dataclass
class InputStats:
    sq: Tensor | None = None  # Σ x_j², shaped to broadcast against the GEMM weight
    gram: Tensor | None = None  # Σ xxᵀ over GEMM columns (cols × cols), float32
    tokens: int = 0

    def add(self, module: nn.Module, args: tuple, kwargs: dict, gram: bool) -> None:
        if gram:
            x = _columns(module, args, kwargs)
            if self.gram is None:
                self.gram = x.new_zeros(x.shape[1], x.shape[1])
            self.gram.addmm_(x.t(), x)  # in place: no second cols × cols matrix per batch
            self.tokens += len(x)
        else:
            s = _input_sq(module, args, kwargs).float()
            self.sq = s if self.sq is None else self.sq.add_(s)

    def norms(self) -> Tensor:
        """‖X_j‖₂ per GEMM column."""
        if self.sq is not None:
            return self.sq.sqrt()
        assert self.gram is not None
        return torch.diagonal(self.gram).clamp(min=0).sqrt()[None, :]


def _columns(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The inputs as the GEMM sees them: (tokens or positions, columns), float32."""
    x = (args[0] if args else next(iter(kwargs.values()))).detach()
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return x.reshape(-1, x.shape[-1]).float()
    if (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and not isinstance(module.padding, str)):
        return _conv_patches(module, x.float())
    raise ConfigError(f"SparseGPT rebuilds Linear layers and ungrouped Conv1d/Conv2d; '{type(module).__name__}' "
                      f"layers need another criterion or an exclude")


class Collector:
    """Forward pre-hooks that accumulate ``InputStats`` for ``modules`` while a block runs."""

    def __init__(self, modules: Iterable[nn.Module], gram: bool) -> None:
        self.gram = gram
        self.stats: dict[nn.Module, InputStats] = {}
        self._owner: dict[int, nn.Module] = {}  # id of a shared InputStats -> the module that fills it
        # this call's input tensors -> their statistic; holding the tensor keeps its id from being reused
        self._seen: dict[int, tuple[Tensor, InputStats]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if module not in self.stats:  # first call: share with an earlier layer fed the same tensor
            seen = self._seen.get(id(x)) if isinstance(x, Tensor) else None
            self.stats[module] = seen[1] if seen is not None else InputStats()
            self._owner.setdefault(id(self.stats[module]), module)
        stats = self.stats[module]
        if isinstance(x, Tensor):
            self._seen[id(x)] = (x, stats)
        if self._owner[id(stats)] is module:
            stats.add(module, args, kwargs, self.gram)

    def next_call(self) -> None:
        """Forget this call's tensors (their ids are reused by the next call's)."""
        self._seen.clear()

    def close(self) -> dict[nn.Module, InputStats]:
        for handle in self._handles:
            handle.remove()
        unique = list({id(s): s for s in self.stats.values()}.values())
        distributed.all_reduce_sum_(t for s in unique for t in (s.sq, s.gram) if t is not None)
        return self.stats
