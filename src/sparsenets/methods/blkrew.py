"""BLK-REW (Ma et al.): block pruning after training with a reweighted group-lasso penalty.

Each weight, in GEMM form ``out × in·kh·kw``, is cut into groups by the config's pattern;
with ``block:Rx1`` a group is one column inside a block of ``R`` rows. Training adds

    λ · Σ_g ‖W_g‖² / (‖W_g^old‖² + ε)

where ``W_g^old`` is refreshed from the current weights every ``refresh_every`` updates. Groups
that are already small get a large coefficient and are pushed to zero, big ones are left alone:
a cheap stand-in for an ℓ0 penalty on groups. Then the model is hard-pruned to the target by
magnitude (:func:`sparsify_`) and fine-tuned.

The penalty enters as a gradient: :meth:`BlockReweighted.before_optimizer_step` adds
``2λ W / (‖W_g^old‖² + ε)`` to each weight's ``.grad``, so the loss and the training loop stay the
user's own. :meth:`BlockReweighted.penalty` gives the same term as a differentiable value, for
logging, or for adding to the loss in a loop that doesn't call the hook (never both).

Adaptive optimizers rescale that gradient per element, so a small group's pull to zero is no
stronger than any other step. With ``decoupled=True`` the penalty is instead applied after each
optimizer step as its proximal step, ``W_g ← W_g / (1 + 2·lr·λ / (‖W_g^old‖² + ε))`` (as AdamW
decouples weight decay): the shrinking then follows the reweighting whatever the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..batches import LossFn
from ..config import SparsityConfig
from ..errors import ConfigError, PatternError
from ..gemm import from_gemm, to_gemm
from ..integrations import distributed
from ..masking import parametrization_list
from ..targets import Member, find_units
from .base import Method


class BlockReweighted(Method):
    """Reweighted group-lasso training, then one-shot pruning to the config's sparsity.

    ``strength`` is λ, ``eps`` is ε. Pruning happens at update ``prune_at`` (None: only when
    :meth:`apply` is called); the penalty stops there, and training on is the fine-tuning::

        method = BlockReweighted(model, {"sparsity": 0.9, "pattern": "block:8x1"}, strength=1e-4)
        Trainer(model, data, TrainConfig(epochs=20), hooks=[method]).fit()
        method.apply()  # then fine-tune

    ``decoupled=True`` shrinks the weights after each optimizer step instead of adding to their
    gradients; it needs :meth:`on_train_begin` to have seen the optimizer (for the learning rate).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, strength: float = 1e-4, refresh_every: int = 100,
                 eps: float = 1e-3, prune_at: int | None = None, decoupled: bool = False) -> None:
        super().__init__(model, config, data, loss_fn)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ConfigError(f"strength must be a number >= 0, got {strength!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ConfigError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise ConfigError(f"eps must be a number > 0, got {eps!r}")
        if prune_at is not None and prune_at < 0:
            raise ConfigError(f"prune_at must be >= 0, got {prune_at!r}")
        if not isinstance(decoupled, bool):
            raise ConfigError(f"decoupled must be True or False, got {decoupled!r}")
        if self.config.target_pattern.selects_locally:
            raise PatternError(f"pattern {self.config.pattern} has no groups to penalise; "
                               f"use block:Rx1 or block:1xC")
        self.strength, self.eps = float(strength), float(eps)
        self.refresh_every, self.prune_at = refresh_every, prune_at
        self.members: list[Member] = [m for unit in find_units(model, self.config) for m in unit.weights]
        self.coefficients: dict[str, Tensor] = {}  # 1 / (‖W_g^old‖² + ε), spread over each weight's elements
        self.decoupled = decoupled
        self.learning_rates: dict[int, dict] = {}  # id(parameter) -> its optimizer param group
        self.done = False
        self.reserve_masks()
        self.refresh()

    def refresh(self) -> None:
        """Take ``W^old`` from the current weights."""
        with torch.no_grad():
            for m in self.members:
                gemm = to_gemm(m.module, m.tensor().detach()).to(torch.float64)
                ids = m.ids.to(gemm.device)
                norms = torch.zeros(int(ids.max()) + 1, dtype=torch.float64, device=gemm.device)
                norms.index_add_(0, ids.reshape(-1), gemm.reshape(-1) ** 2)
                coefficient = (1.0 / (norms + self.eps))[ids]
                self.coefficients[m.qualname] = from_gemm(m.module, coefficient, m.tensor().shape).to(m.tensor().dtype)
        # the first refresh sees each rank's own initial weights, before DDP makes them rank 0's
        distributed.broadcast_(self.coefficients.values())

    def penalty(self) -> Tensor:
        """λ · Σ_g ‖W_g‖² / (‖W_g^old‖² + ε) over every target weight (differentiable)."""
        terms = [(self.coefficients[m.qualname] * m.tensor() ** 2).sum() for m in self.members]
        return self.strength * torch.stack(terms).sum()

    def apply(self) -> None:
        """Hard-prune to the config's sparsity; the penalty stops."""
        self.prune(self.config.target_sparsity)
        self.done = True

    # ---- hooks -------------------------------------------------------------------------------

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        self.learning_rates = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        if self.prune_at == 0 and not self.done:
            self.apply()

    def before_optimizer_step(self, step: int) -> None:
        if self.done or self.strength == 0 or self.decoupled:
            return
        with torch.no_grad():
            for m in self.members:
                weight = _parameter(m)
                gradient = 2 * self.strength * self.coefficients[m.qualname] * m.tensor()
                weight.grad = gradient.clone() if weight.grad is None else weight.grad.add_(gradient)

    def step(self, step: int) -> None:
        if self.done:
            return
        if self.decoupled and self.strength > 0:
            self.shrink()
        if step == self.prune_at:
            self.apply()
        elif step % self.refresh_every == 0:
            self.refresh()

    def shrink(self) -> None:
        """The penalty's proximal step at each weight's current learning rate (``decoupled=True``)."""
        with torch.no_grad():
            for m in self.members:
                weight = _parameter(m)
                group = self.learning_rates.get(id(weight))
                if group is None:
                    raise RuntimeError(f"decoupled BLK-REW: '{m.qualname}' is in no optimizer seen by "
                                       f"on_train_begin(model, optimizer); call it before training")
                weight.div_(1 + 2 * group["lr"] * self.strength * self.coefficients[m.qualname])


def _parameter(member: Member) -> Tensor:
    """The trained tensor behind a weight: the original under a mask, else the weight itself."""
    if parametrize.is_parametrized(member.module, member.param):
        return parametrization_list(member.module, member.param).original
    return member.tensor()
