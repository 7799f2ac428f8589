"""Hugging Face ``transformers``: run any method inside ``Trainer``, and save masked models for ``from_pretrained``.

- :class:`SparsityCallback` calls a method's hooks from ``Trainer``'s callback events.
- :func:`save_pretrained` writes the masked weights baked in, under their plain names, so plain
  ``from_pretrained`` loads the zeros and the outputs; the masks go to a side file
  (:data:`MASKS_FILE`) and the recipe to ``config.json`` (``config.sparsenets``).
- :func:`restore_masks` puts the masks back on the loaded model for further sparse training.

``model.save_pretrained`` of a masked model would write parametrize's keys
(``…parametrizations.weight.original``), which ``from_pretrained`` does not recognise: it would
re-initialise those weights without an error.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from .._version import __version__
from ..config import SparsityConfig, as_config
from ..errors import CheckpointError
from ..masking import Mask, attach, masks, parametrization_list
from ..methods import Method
from ..methods.state import copy_masks
from ..report import report

MASKS_FILE = "sparsenets_masks.safetensors"


# ---- Trainer ---------------------------------------------------------------------------------


class SparsityCallback(TrainerCallback):
    """Drive ``method`` from ``transformers.Trainer``: ``Trainer(..., callbacks=[SparsityCallback(method)])``.

    Build the method before ``trainer.train()``. Its hooks get ``step`` = updates done
    (``state.global_step``), so gradient accumulation counts one step per optimizer update.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self._started = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._started = False
        if optimizer is not None:  # some set-ups (FSDP, SageMaker) create it later: see on_step_begin
            self._start(optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self._started:
            if optimizer is None:
                raise RuntimeError("Trainer gave SparsityCallback no optimizer before the first update")
            self._start(optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.method.before_optimizer_step(state.global_step + 1)  # the update about to be made

    def on_step_end(self, args, state, control, **kwargs):
        self.method.step(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        # state.epoch is fractional (epoch + share of it done); an epoch cut short by max_steps still ends
        self.method.on_epoch_end(max(1, math.ceil(state.epoch - 1e-6)))

    def _start(self, optimizer: Any) -> None:
        self.method.on_train_begin(self.method.model, optimizer)
        self._started = True


# ---- save_pretrained / from_pretrained ---------------------------------------------------------


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every masked tensor baked in (``original * mask``) under its plain name."""
    state = model.state_dict()
    for module_name, module, name, _ in masks(model):
        others = [p for p in parametrization_list(module, name) if not isinstance(p, Mask)]
        if others:
            raise CheckpointError(f"{module_name}.{name} has other parametrizations "
                                  f"({[type(p).__name__ for p in others]}); remove them first")
        prefix = f"{module_name}.parametrizations.{name}." if module_name else f"parametrizations.{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        with torch.no_grad():
            state[_key(module_name, name)] = getattr(module, name).detach()
    return state


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, method: Method | None = None,
                    config: SparsityConfig | dict | str | None = None, **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` for a masked model; returns ``path``.

    Weights are saved with the masks applied under their plain names (plain ``from_pretrained``
    loads them, zeros included), the masks in ``path/sparsenets_masks.safetensors``, and
    ``config.json`` gets ``sparsenets``: the version, the method and its options, the
    sparsity config (``config``, or the method's), and each layer's pattern and density.
    """
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        raise TypeError(f"save_pretrained needs a Hugging Face model (a PreTrainedModel), got {type(model).__name__}")
    path, state = Path(path), plain_state_dict(model)
    hf_config: Any = model.config
    had, previous = hasattr(hf_config, "sparsenets"), getattr(hf_config, "sparsenets", None)
    hf_config.sparsenets = recipe(model, method, config)
    try:  # the record describes this save only: the live model's config is left as it was
        model.save_pretrained(path, state_dict=state, **kwargs)  # type: ignore[operator]
    finally:
        if had:
            hf_config.sparsenets = previous
        else:
            del hf_config.sparsenets
    _save_masks(model, path / MASKS_FILE)
    return path


def recipe(model: nn.Module, method: Method | None = None, config: SparsityConfig | dict | str | None = None
           ) -> dict[str, Any]:
    """How ``model`` was made, as JSON-ready data: what :func:`save_pretrained` writes to ``config.sparsenets``."""
    if config is None and method is not None:
        config = method.config
    result = report(model)
    record: dict[str, Any] = {
        "version": __version__,
        "method": None if method is None else {"name": type(method).__name__, "options": _options(method)},
        "config": None if config is None else as_config(config).to_dict(),
        "sparsity": result.sparsity,
        "layers": {row.name: {"pattern": row.pattern, "density": row.density} for row in result.rows},
        "masks": MASKS_FILE if next(masks(model), None) is not None else None,
    }
    return json.loads(json.dumps(record, default=str))  # tuples, classes and the like as JSON


def restore_masks(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the masks that :func:`save_pretrained` saved in ``path`` back on ``model`` (in place; returns it).

    ``path`` is the ``save_pretrained`` directory or the masks file itself. Every mask is checked
    against the model before the first is attached.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MASKS_FILE
    if not file.is_file():
        raise CheckpointError(f"no sparsenets masks file at {str(file)!r} (was the model saved with "
                              f"sparsenets.integrations.huggingface.save_pretrained?)")
    with safe_open(str(file), framework="pt") as handle:
        patterns = json.loads((handle.metadata() or {}).get("patterns", "{}"))
        loaded = {key: handle.get_tensor(key) for key in handle.keys()}
    targets = {key: _target(model, key, mask) for key, mask in loaded.items()}
    for key, (module, name) in targets.items():
        attach(module, name, loaded[key], patterns.get(key, "unstructured"))
    return model


def _save_masks(model: nn.Module, file: Path) -> None:
    saved = copy_masks(model)
    tensors = {key: mask.cpu().contiguous() for key, (mask, _) in saved.items()}
    patterns = {key: pattern for key, (_, pattern) in saved.items()}
    save_file(tensors, str(file), metadata={"format": "sparsenets-masks", "patterns": json.dumps(patterns)})


def _target(model: nn.Module, key: str, mask: Tensor) -> tuple[nn.Module, str]:
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"the masks file has a mask for {key!r}, but the model has no module "
                              f"{module_name!r}") from None
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor):
        raise CheckpointError(f"the masks file has a mask for {key!r}, but {module_name!r} has no tensor {name!r}")
    if tuple(tensor.shape) != tuple(mask.shape):
        raise CheckpointError(f"the mask for {key!r} has shape {tuple(mask.shape)}, "
                              f"the model's tensor {tuple(tensor.shape)}")
    return module, name


def _key(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


def _options(method: Method) -> dict[str, Any]:
    """The method's keyword-only options (``start``, ``update_every``…) as they are set on it."""
    names = [p.name for p in inspect.signature(type(method).__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    values = {name: getattr(method, name) for name in names if hasattr(method, name)}
    return {name: v for name, v in values.items() if v is None or isinstance(v, (bool, int, float, str))}
