"""N:M sparse training from scratch: SR-STE and progressive gradient flow, for any N:M.

Both keep the dense weight and recompute the N:M mask from ``|w|`` every ``update_every`` updates,
so weights can move in and out of the mask while training. They differ in how pruned weights take
part in training:

- :class:`SRSTE` (Zhou et al. 2021): the forward uses the N:M-masked weight; the gradient passes
  straight through to *all* dense weights, and pruned ones get the refined decay ``λ·w`` on top,
  pulling them towards zero so the mask settles.
- :class:`ProgressiveNM` (Bambhaniya et al. 2024): pruned weights are scaled by ``β`` decaying
  from 1 to 0 (so their gradient decays too), and/or the structure steps from a denser n:M
  down to N:M (e.g. 4:16 → 2:16 → 1:16). Once ``β`` is 0 and the structure is N:M, every
  forward uses an exact N:M weight.

The model code is untouched: each weight gets an :class:`NMTraining` parametrization.
:meth:`NMMethod.finalize` swaps it for a core :class:`~sparsenets.masking.Mask` holding the final
N:M mask, so the result is an ordinary masked model. In your own loop::

    method = ProgressiveNM(model, {"pattern": "1:8", "exclude": ["embed"]}, total_steps=3000)
    optimizer = torch.optim.Adam(model.parameters())   # after the method: weights moved
    method.on_train_begin(model, optimizer)
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward()
        method.before_optimizer_step(step); optimizer.step(); method.step(step)
    method.finalize()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..batches import LossFn
from ..config import SparsityConfig, as_config
from ..errors import ConfigError, PatternError
from ..gemm import is_hf_conv1d
from ..integrations import distributed
from ..masking import _make_picklable, attach, parametrization_list
from ..patterns import NM
from ..targets import find_units
from .base import Method


class NMTraining(nn.Module):
    """Parametrization: ``w·mask + scale·w·(1 − mask)``, the mask ``n`` of every ``m`` inputs by |w|.

    With ``straight_through`` the forward value is ``w·mask`` but the gradient reaches every
    element of ``w`` unchanged (SR-STE); otherwise pruned elements get ``scale`` times theirs.
    """

    mask: Tensor

    def __init__(self, weight: Tensor, n: int, m: int, transposed: bool = False,
                 straight_through: bool = False) -> None:
        super().__init__()
        self.n, self.m, self.transposed, self.straight_through = n, m, transposed, straight_through
        self.scale = 0.0
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.refresh(weight)

    def refresh(self, weight: Tensor) -> None:
        """Recompute the mask: the ``n`` largest |w| in every run of ``m`` GEMM columns."""
        with torch.no_grad():
            gemm = weight.t() if self.transposed else weight.reshape(weight.shape[0], -1)
            keep = _select(gemm.abs(), self.n, self.m)
            self.mask.copy_(keep.t() if self.transposed else keep.reshape(weight.shape))

    def forward(self, weight: Tensor) -> Tensor:
        kept = weight * self.mask
        if self.straight_through:
            return weight + (kept - weight).detach()
        if self.scale == 0.0:
            return kept
        return kept + self.scale * (weight - kept)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, scale={self.scale:g}, straight_through={self.straight_through}"


def _select(scores: Tensor, n: int, m: int) -> Tensor:
    return NM(n, m).select(scores) if n < m else torch.ones_like(scores, dtype=torch.bool)


def _nm_pattern(config: SparsityConfig) -> NM:
    n_m = config.target_pattern.n_m
    if n_m is None:
        raise PatternError(f"N:M training needs an N:M pattern such as '2:4' or '1:16', "
                           f"got {str(config.pattern)!r}")
    return NM(*n_m)


class NMMethod(Method):
    """Shared machinery: parametrize every selected weight, refresh masks, finalize to core masks.

    ``data``/``loss_fn`` are accepted like every method's; the masks come from |w| alone.
    """

    straight_through = False

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, update_every: int = 1) -> None:
        super().__init__(model, config, data, loss_fn)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every must be an integer >= 1, got {update_every!r}")
        self.pattern = _nm_pattern(self.config)
        self.update_every = update_every
        self.finalized = False
        self.parametrizations: list[tuple[nn.Module, str, NMTraining]] = []
        for unit in find_units(model, self.config):  # checks every input size is a multiple of M
            for member in unit.weights:
                module, name = member.module, member.param
                p = NMTraining(getattr(module, name).detach(), self.n_at(0), self.pattern.m,
                               transposed=is_hf_conv1d(module), straight_through=self.straight_through)
                parametrize.register_parametrization(module, name, p)
                _make_picklable(module)
                self.parametrizations.append((module, name, p))
        if not self.parametrizations:
            raise ConfigError("N:M training found no layer to sparsify; check 'include'/'exclude'")
        self._set_schedule(0)

    # ---- schedule (subclasses override) --------------------------------------------------------

    def n_at(self, step: int) -> int:
        return self.pattern.n

    def scale_at(self, step: int) -> float:
        return 0.0

    def _set_schedule(self, step: int) -> None:
        n, scale = self.n_at(step), self.scale_at(step)
        for module, name, p in self.parametrizations:
            changed = p.n != n
            p.n, p.scale = n, scale
            if changed:
                p.refresh(_dense(module, name))

    # ---- hooks -----------------------------------------------------------------------------------

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        """Under a process group, take rank 0's masks: each rank computed its own from the weights it
        had when the method was built, and DDP has since given every rank rank 0's weights."""
        distributed.broadcast_(p.mask for *_, p in self.parametrizations)

    def step(self, step: int) -> None:
        """After update ``step``: move the schedule on and recompute masks every ``update_every``."""
        self._set_schedule(step)
        if step % self.update_every == 0:
            for module, name, p in self.parametrizations:
                p.refresh(_dense(module, name))

    def finalize(self) -> nn.Module:
        """Replace each N:M-training parametrization by a core ``Mask`` at the target N:M."""
        if self.finalized:
            return self.model
        for module, name, p in self.parametrizations:
            dense = _dense(module, name).clone()
            p.n = self.pattern.n
            p.refresh(dense)
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            with torch.no_grad():
                getattr(module, name).copy_(dense)
            attach(module, name, p.mask.clone(), self.pattern.name)
        self.finalized = True
        return self.model

    def violations(self) -> int:
        """Number of M-groups whose current effective weight has more than N nonzeros."""
        total = 0
        for module, name, _ in self.parametrizations:
            weight = getattr(module, name).detach()
            gemm = weight.t() if is_hf_conv1d(module) else weight.reshape(weight.shape[0], -1)
            groups = (gemm != 0).reshape(gemm.shape[0], -1, self.pattern.m).sum(-1)
            total += int((groups > self.pattern.n).sum())
        return total


def _dense(module: nn.Module, name: str) -> Tensor:
    return parametrization_list(module, name).original.detach()


class SRSTE(NMMethod):
    """SR-STE: N:M forward, straight-through gradient, refined decay ``λ`` on the pruned weights."""

    straight_through = True

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, decay: float = 2e-4, update_every: int = 1) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ConfigError(f"decay (SR-STE's λ) must be a number >= 0, got {decay!r}")
        self.decay = float(decay)
        super().__init__(model, config, data, loss_fn, update_every=update_every)

    def before_optimizer_step(self, step: int) -> None:
        for module, name, p in self.parametrizations:
            original = parametrization_list(module, name).original
            if original.grad is not None:
                original.grad.add_(self.decay * original.detach() * ~p.mask)


class ProgressiveNM(NMMethod):
    """Progressive gradient flow: decay pruned weights' scale 1 → 0 and/or step n:M down to N:M.

    ``decay_end`` (fraction of ``total_steps``, default 0.5): where the scale ``β`` reaches 0
    (linearly; ``None`` for no decay, i.e. pruned weights are zero from the start).
    ``structure``: the n of each stage, densest first, ending at N (e.g. ``[4, 2, 1]`` for 1:16
    through 4:16 and 2:16); stages split ``[0, decay_end·total_steps]`` evenly.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, total_steps: int, decay_end: float | None = 0.5,
                 structure: Sequence[int] | None = None, update_every: int = 1) -> None:
        config = as_config(config)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if decay_end is not None and not 0.0 < decay_end <= 1.0:
            raise ConfigError(f"decay_end must be in (0, 1] or None, got {decay_end!r}")
        n, m = _nm_pattern(config).n_m
        stages = list(structure) if structure is not None else [n]
        if any(not isinstance(s, int) or not n <= s < m for s in stages) or stages[-1] != n \
                or stages != sorted(stages, reverse=True):
            raise ConfigError(f"structure must be decreasing n's in [{n}, {m}) ending at {n}, got {structure!r}")
        self.total_steps, self.decay_end, self.stages = total_steps, decay_end, stages
        super().__init__(model, config, data, loss_fn, update_every=update_every)

    def _end(self) -> float:
        return (self.decay_end if self.decay_end is not None else 0.5) * self.total_steps

    def n_at(self, step: int) -> int:
        stage = int(len(self.stages) * step / self._end())
        return self.stages[min(stage, len(self.stages) - 1)]

    def scale_at(self, step: int) -> float:
        if self.decay_end is None:
            return 0.0
        return max(0.0, 1.0 - step / (self.decay_end * self.total_steps))


