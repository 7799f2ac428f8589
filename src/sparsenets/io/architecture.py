"""Describing a model's structure in JSON, and building it again from that description.

A model is rebuilt without pickle in one of three ways: a built-in model by name
(:func:`sparsenets.models.build_model` options), a torch layer or ``nn.Sequential`` of torch
layers described layer by layer (constructor arguments read back from the layer's attributes),
or a model the caller passes to ``load``. Sparse kernel layers made by ``compress`` are
described by the dense layer they replaced and rebuilt from it.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

from ..errors import CheckpointError
from ..gemm import is_hf_conv1d
from ..record import get_record

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def plain(value: Any) -> Any:
    """A JSON value for a simple attribute (tuples tagged so they come back as tuples), or TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [plain(v) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    raise TypeError(type(value).__name__)


def unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(unplain(v) for v in value["tuple"])
    if isinstance(value, list):
        return [unplain(v) for v in value]
    return value


def _class_name(module: nn.Module) -> str | None:
    """The name a module's class is rebuilt from: torch.nn layers and HF Conv1D only."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if is_hf_conv1d(module):
        return HF_CONV1D
    return None


def _resolve(name: Any) -> type:
    """The class for a name written by :func:`_class_name`; nothing else can be named."""
    if isinstance(name, str) and name.startswith("torch.nn.") and "." not in name[len("torch.nn."):]:
        cls = getattr(nn, name[len("torch.nn."):], None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if name == HF_CONV1D:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    raise CheckpointError(f"unknown layer class {name!r} (only torch.nn layers and HF Conv1D are rebuilt by name)")


def describe_layer(module: nn.Module) -> dict[str, Any] | None:
    """``{"class": ..., "init": {...}}`` rebuilding ``module``'s structure, or None if we can't.

    The constructor arguments are read back from the attributes of the same name, which
    torch.nn layers keep; ``bias`` is whether the layer has one.
    """
    name = _class_name(module)
    if name is None:
        return None
    init = {}
    for param in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in ("device", "dtype"):
            continue
        if param.name == "bias" and isinstance(param.default, bool) and "bias" in module._parameters:
            init["bias"] = module._parameters["bias"] is not None
        elif hasattr(module, param.name):
            try:
                init[param.name] = plain(getattr(module, param.name))
            except TypeError:
                return None
        elif param.default is param.empty:
            return None
    return {"class": name, "init": init}


def is_replacement(module: nn.Module) -> bool:
    """A sparse kernel layer that ``compress`` put in place of a dense one."""
    return hasattr(module, "dense_weight") and get_record(module).origin is not None


def describe_sequential(model: nn.Module) -> dict[str, Any] | None:
    """A nested description of an ``nn.Sequential`` of describable layers, or None."""
    if type(model) is not nn.Sequential:
        return get_record(model).origin if is_replacement(model) else describe_layer(model)
    children = {}
    for name, child in model.named_children():
        children[name] = describe_sequential(child)
        if children[name] is None:
            return None
    return {"class": "torch.nn.Sequential", "children": children}


def build_described(spec: dict[str, Any]) -> nn.Module:
    if spec["class"] == "torch.nn.Sequential":
        return nn.Sequential(OrderedDict((k, build_described(v)) for k, v in spec["children"].items()))
    init = {k: unplain(v) for k, v in spec["init"].items()}
    return _resolve(spec["class"])(**init)


def attributes(module: nn.Module) -> dict[str, Any]:
    """A module's public attributes of plain types: sizes, counts, flags (private ones belong to
    torch or the library that built the module, and the constructor sets them)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        try:
            out[key] = plain(value)
        except TypeError:
            continue
    return out


# ---- the architecture entry of a checkpoint -----------------------------------------------------------


def describe_architecture(model: nn.Module, builtin: dict[str, Any] | None) -> dict[str, Any]:
    """How ``load`` builds the model: the built-in model ``builtin`` names, the layers, or nothing."""
    if builtin is not None:
        if not isinstance(builtin, dict) or "name" not in builtin:
            raise ValueError(f"architecture must be a dict with a model 'name' (and its options), got {builtin!r}")
        try:
            return {"kind": "builtin", "spec": json.loads(json.dumps(builtin))}
        except TypeError as err:
            raise ValueError(f"architecture must hold plain values (numbers, strings, lists): {err}") from None
    layers = describe_sequential(model)
    if layers is not None:
        return {"kind": "layers", "layers": layers}
    cls = type(model)
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


def build_architecture(architecture: dict[str, Any]) -> nn.Module | None:
    """The dense model an architecture entry describes, or None when only the caller can build it."""
    kind = architecture.get("kind")
    if kind == "builtin":
        from ..models import build_model

        spec = dict(architecture["spec"])
        return build_model(spec.pop("name"), spec.pop("input_shape"), spec.pop("num_classes"), **spec)
    if kind == "layers":
        return build_described(architecture["layers"])
    return None


def given_model(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    built = model if isinstance(model, nn.Module) else model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"model= must be an nn.Module or a function returning one, got {type(built).__name__}")
    return built


# ---- sparse kernel layers -----------------------------------------------------------------------------


def sparse_layer(dense: nn.Module, spec: dict, mask: Tensor) -> nn.Module:
    """The sparse kernel ``compress`` chose (``spec["kind"]``), rebuilt from the loaded dense layer."""
    weight, bias = cast(Tensor, dense.weight).detach(), getattr(dense, "bias", None)
    if is_hf_conv1d(dense):
        weight, mask = weight.t(), mask.t()
    kind = spec["kind"]
    if kind == "CSRLinear":
        from ..layers.csr import CSRLinear

        return CSRLinear.from_dense(weight, mask, bias)
    if kind == "NMSparseLinear":
        from ..layers.nm import NMSparseLinear

        return NMSparseLinear.from_dense(weight, mask, bias, int(spec["n"]), int(spec["m"]))
    from ..layers import block_sparse

    if kind == "BlockSparseLinear":
        return block_sparse.BlockSparseLinear.from_dense(weight, mask, bias, tuple(spec["block"]))
    if kind in ("BlockSparseConv1d", "BlockSparseConv2d"):
        return getattr(block_sparse, kind).from_dense(dense, weight, mask, tuple(spec["block"]))
    raise ValueError(f"unknown sparse layer kind {kind!r}")


__all__ = ["attributes", "build_architecture", "build_described", "describe_architecture", "describe_layer",
           "describe_sequential", "given_model", "is_replacement", "plain", "sparse_layer", "unplain"]
