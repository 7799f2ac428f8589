"""What every sparsity method shares: the training-loop hooks and intermediate sparsity targets.

A method is an object that holds a model and a :class:`~sparsenets.SparsityConfig` and is
told where training stands. The built-in :class:`~sparsenets.experiments.Trainer` calls the
hooks; in your own loop, call ``method.step(step)`` right after ``optimizer.step()``, with
``step`` the number of updates done so far (1 after the first)::

    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        method.step(step)

Methods prune with :func:`sparsenets.sparsify_`, so any pattern, criterion and allocation of
the config works, and pruned weights stay exactly zero (masks are parametrizations).

Under ``torch.distributed`` (DDP, FSDP) build the method first, then wrap the model, then build
the optimizer; every rank then takes the same decisions (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..batches import LossFn
from ..config import SparsityConfig, as_config
from ..errors import ConfigError
from ..integrations import distributed
from ..masking import attach, get_mask
from ..patterns import Pattern
from ..report import report
from ..sparsify import sparsify_
from ..targets import find_units


class Method:
    """Base class: no-op hooks, and :meth:`prune` to a given intermediate sparsity.

    Every method is built as ``Method(model, config, data=None, loss_fn=None, *, options...)``:
    ``config`` is a :class:`~sparsenets.SparsityConfig`, a dict of its keys or a YAML path (all
    three mean the same), and ``data``/``loss_fn`` are passed to :func:`sparsify_` for criteria
    that need data (snip, grasp, taylor, wanda).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str,
                 data: Iterable | None = None, loss_fn: LossFn | None = None) -> None:
        self.model = model
        self.config = as_config(config)
        self.data = data
        self.loss_fn = loss_fn

    # ---- hooks (the Trainer calls them; so can your own loop) ----------------------------------

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        """Before the first update of a training run."""

    def before_optimizer_step(self, step: int) -> None:
        """After ``backward()``, before ``optimizer.step()``: gradients are there to read or change."""

    def step(self, step: int) -> None:
        """After ``optimizer.step()``; ``step`` is the number of updates done so far."""

    def on_epoch_end(self, epoch: int) -> None:
        """After the last update of epoch ``epoch`` (counted from 1)."""

    # ---- pruning -------------------------------------------------------------------------------

    def prune(self, sparsity: float) -> SparsityConfig | None:
        """Prune the model to ``sparsity`` on the way to the config's target; what is pruned stays pruned.

        Returns the config that was applied, or None when there was nothing to prune yet.
        """
        config = config_at(self.config, sparsity)
        if config is not None:
            sparsify_(self.model, config, self.data, self.loss_fn)
        return config

    def reserve_masks(self) -> None:
        """Under a process group, put all-ones masks on every weight the method will prune later.

        Masking a weight replaces it by a parametrization, which must happen before the model is
        wrapped (DDP, FSDP register its parameters then); pruning later only rewrites the masks in
        place. A single process needs no reservation and gets none.
        """
        if not distributed.active():
            return
        for unit in find_units(self.model, self.config):
            for m in unit.members:
                if get_mask(m.module, m.param) is None:
                    ones = torch.ones_like(m.tensor(), dtype=torch.bool)
                    attach(m.module, m.param, ones, str(unit.pattern))

    def density(self) -> float:
        """Fraction of the weights (of every layer sparsenets can sparsify) that are nonzero."""
        return report(self.model).density




def config_at(config: SparsityConfig, sparsity: float) -> SparsityConfig | None:
    """The config for an intermediate target ``sparsity`` on the way to ``config``.

    Overall sparsity becomes ``sparsity``, per-layer ``overrides`` scale in proportion, and the
    pattern becomes :meth:`Pattern.at_density` of the target (N:M steps through n:M with n
    nearest the target density, as N:M takes no other densities). None when nothing would be
    pruned yet.
    """
    final, final_pattern = config.target_sparsity, config.target_pattern
    if not 0.0 <= sparsity <= final + 1e-12:
        raise ConfigError(f"intermediate sparsity {sparsity!r} is outside [0, {final:g}] (the config's target)")
    scale = sparsity / final if final > 0 else 0.0
    pattern = final_pattern.at_density(1.0 - sparsity)
    if pattern is None:
        return None
    if pattern.fixed_density is not None:
        sparsity = 1.0 - pattern.fixed_density
    overrides = {glob: _override_at(value, final_pattern, scale) for glob, value in config.overrides.items()}
    return dataclasses.replace(config, sparsity=sparsity, pattern=pattern, overrides=overrides)


def _override_at(override: dict[str, Any], default_pattern: Pattern, scale: float) -> dict[str, Any]:
    if "sparsity" not in override:  # the allocation decides this layer's share
        return override
    pattern = override.get("pattern", default_pattern)
    target = override["sparsity"] * scale
    if pattern.fixed_density is None:
        return {**override, "sparsity": target}
    stepped = pattern.at_density(1.0 - target)
    # "unstructured" at sparsity 0 is how a config keeps a layer dense (a fixed-density pattern can't be 0)
    return {"sparsity": 0.0, "pattern": "unstructured"} if stepped is None else {"pattern": stepped}
