"""``save(model, path)`` and ``load(path)``: a masked, compressed or plain model in one checkpoint.

The header (JSON in the file's metadata) holds per tensor its encoding, shape and dtype (see
:mod:`.encoding`); the masks to re-attach, with their pattern; the layers ``compress`` replaced
by sparse kernels; each module's :class:`~sparsenets.record.CompressionRecord` and simple public
attributes (sizes, head counts, flags), so a model cut down by ``compress`` rebuilds at its new
sizes; and how to build the architecture (see :mod:`.architecture`). The file and its digest
are :mod:`.container`'s.

Structured layers' bool and integer tensors (a quantized layer's codes and mask) are stored
bit-packed, and a buffer only read under a mask (``entry_masks()``, e.g. the codes of a pruned
quantized layer) keeps only its kept entries: its descriptor names the stored mask (``"mask"``),
which is decoded first. Such files are version 4; others are written exactly as before.

Loading checks, before it allocates anything the size of a tensor, that every tensor the file
claims fits the model it is loaded into: the same shape, or, for layers ``compress`` cut down,
no dimension larger. A model the file itself describes may take at most
``EXPANSION_LIMIT`` times the file's size (or ``SMALL_MODEL_BYTES``), so a forged header
can't ask for gigabytes.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..config import SparsityConfig
from ..errors import CheckpointError
from ..formats import is_structured
from ..masking import attach, finalize_, masks
from ..patterns import block_shape_of
from ..record import get_record, has_record, set_record
from ..utils import atomic
from . import architecture as A
from . import container
from .encoding import bit_packed, decode, describe, encode

FORMAT = "sparsenets-checkpoint"
VERSION = 4  # 4: bit-packed integer codes; 3: structured layers (low-rank, Monarch, MoRe); 2 read as before
EXPANSION_LIMIT = 1024  # 99.9%-sparse models stay well under it
SMALL_MODEL_BYTES = 64 << 20
SECTIONS = ("architecture", "tensors", "aliases", "masks", "replaced", "records", "attributes")


# ---- what a model holds ---------------------------------------------------------------------------------



def _replacement_state(path: str, module: Any) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """A sparse layer's weight as the dense layer it replaced would hold it, with its structure.

    ``module`` is any sparse kernel layer (:func:`~.architecture.is_replacement`): it has ``dense_weight()``.
    """
    weight = module.dense_weight().detach()
    mask = module.mask() if hasattr(module, "mask") else _structure_mask(module)
    origin = get_record(module).origin
    if origin is not None and origin["class"] == A.HF_CONV1D:
        weight, mask = weight.t(), mask.t()
    prefix = f"{path}." if path else ""
    state = {f"{prefix}weight": weight}
    if getattr(module, "bias", None) is not None:
        state[f"{prefix}bias"] = module.bias.detach()
    spec: dict[str, Any] = {"kind": type(module).__name__}
    if hasattr(module, "block"):
        spec["block"] = list(module.block)
    if type(module).__name__ == "NMSparseLinear":
        spec["n"], spec["m"] = module.n, module.m
    return state, {f"{prefix}weight": mask}, spec


def _structure_mask(module: Any) -> Tensor:
    """Which entries a block-sparse layer stores: every element of its kept blocks."""
    from ..kernels import scatter_blocks

    ones = torch.ones_like(module.values, dtype=torch.float32)
    mask = scatter_blocks(ones, module.layout.to(ones.device)) != 0
    return mask.reshape(module.dense_weight().shape)


def _collect(model: nn.Module) -> dict[str, Any]:
    """Everything save writes, from a masked, compressed or plain model."""
    plain = finalize_(copy.deepcopy(model))
    mask_of = {f"{m}.{t}" if m else t: (mask.mask, mask.pattern) for m, _, t, mask in masks(model)}
    state: dict[str, Tensor] = {}
    hints: dict[str, tuple[Tensor | None, tuple[int, int] | None]] = {}
    replaced, attributes, records, structured = {}, {}, {}, {}
    skip: list[str] = []
    packed: list[str] = []  # prefixes of the structured layers, whose integer and bool tensors are bit-packed
    for path, module in plain.named_modules():
        if any(path.startswith(p) for p in skip):
            continue
        if has_record(module):
            records[path] = vars(get_record(module))
        if is_structured(module):  # stored as its own factors; load builds it from its arguments
            structured[path] = {"kind": type(module).__name__, "init": _plain_tree(module.init_args())}
            attributes[path] = {"training": module.training}
            prefix = f"{path}." if path else ""
            packed.append(prefix)
            for name, mask in getattr(module, "entry_masks", dict)().items():  # entries never read aren't stored
                hints[f"{prefix}{name}"] = (mask, None)
            continue
        if A.is_replacement(module):
            part, structure, spec = _replacement_state(path, module)
            state.update(part)
            for key, mask in structure.items():
                hints[key] = (mask, tuple(spec["block"]) if "block" in spec else None)
            replaced[path] = spec
            skip.append(f"{path}." if path else "")
            continue
        attributes[path] = A.attributes(module)
    for key, tensor in plain.state_dict().items():
        if not any(key.startswith(p) for p in skip):
            state[key] = tensor
    for key, (mask, pattern) in mask_of.items():
        hints[key] = (mask, block_shape_of(pattern))
    for path, module in plain.named_modules():
        hint = block_shape_of(get_record(module).pattern)
        key = f"{path}.weight" if path else "weight"
        if hint and key in state and key not in hints:
            hints[key] = (None, hint)
    return {"plain": plain, "state": state, "hints": hints, "replaced": replaced, "attributes": attributes,
            "records": records, "structured": structured, "masks": {k: p for k, (_, p) in mask_of.items()},
            "packed": packed}


def _encode_all(collected: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str]]:
    """The parts to store, the descriptor of each tensor, and tied tensors (stored once)."""
    tensors, descriptors, aliases = {}, {}, {}
    seen: dict[tuple, str] = {}
    stored_as: dict[tuple | None, str] = {}  # the key each tensor is stored under (the first that holds it)
    for key, tensor in collected["state"].items():
        if tensor.numel():
            stored_as.setdefault(_identity(tensor), key)
    for key, tensor in collected["state"].items():
        identity = _identity(tensor)
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        if identity is not None:
            seen[identity] = key
        mask, block = collected["hints"].get(key, (None, None))
        pack = any(key.startswith(p) for p in collected["packed"])
        mask_key = stored_as.get(_identity(mask)) if pack and mask is not None and mask.dtype == torch.bool else None
        info, parts = encode(tensor, mask, block, pack=pack, mask_stored=mask_key not in (None, key))
        if info["encoding"].startswith("masked-"):
            info["mask"] = mask_key
        descriptors[key] = info
        for suffix, part in parts.items():
            tensors[f"{key}::{suffix}" if suffix else key] = part.contiguous()
    return tensors, descriptors, aliases


def _identity(tensor: Tensor) -> tuple | None:
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None


# ---- save ----------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, *, architecture: dict[str, Any] | None = None,
         config: SparsityConfig | dict | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (masked, compressed by :func:`~sparsenets.compress` or plain) to ``path``.

    Args:
        architecture: for built-in models, ``{"name": ..., "input_shape": ..., "num_classes": ...,
            **options}`` as :func:`sparsenets.models.build_model` takes them. Not needed
            for an ``nn.Sequential`` of torch layers; other models are loaded with ``model=``.
        config: the sparsity config, kept in the file for reference.
        metadata: any JSON-able values to keep alongside (accuracy, run name, ...).

    The file is written to a temporary name and renamed, so a failure (an ``OSError`` such as a
    full disk) leaves nothing behind; it gets the permissions the umask gives new files.
    """
    path = Path(path)
    if isinstance(config, SparsityConfig):
        config = config.to_dict()
    collected = _collect(model)
    tensors, descriptors, aliases = _encode_all(collected)
    version = 4 if any(bit_packed(info["encoding"]) for info in descriptors.values()) else \
        3 if collected["structured"] else 2
    header = {  # files with structured layers say version 3 (4 when bit-packed), so older readers ask for an upgrade
        "format": FORMAT, "version": version, "torch": torch.__version__,
        "architecture": A.describe_architecture(collected["plain"], architecture),
        "tensors": descriptors, "aliases": aliases, "masks": collected["masks"],
        "replaced": collected["replaced"], "records": collected["records"],
        "attributes": collected["attributes"], "config": config, "metadata": metadata or {},
    }
    if collected["structured"]:  # a file without structured layers stays a version 2 file, byte for byte
        header["structured"] = collected["structured"]
    try:
        text = json.dumps(header)
    except TypeError as err:
        raise ValueError(f"metadata and config must hold plain JSON values: {err}") from None
    pieces = container.serialize(tensors, {"sparsenets": text})
    atomic.write_with(path, container.write_pieces(pieces))
    return path


# ---- read ----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the stored tensors of a checkpoint, verified against its checksum.

    Raises FileNotFoundError when there is no file, :class:`CheckpointError` naming the file for
    anything else: unreadable, truncated, changed after saving, not a sparsenets checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    metadata, tensors = container.read(path)
    try:
        header = json.loads(metadata["sparsenets"])
    except ValueError as err:
        raise CheckpointError(f"{path}: damaged header: its sparsenets metadata is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("version"), int):
        found = header.get("format") if isinstance(header, dict) else header
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}")
    if header["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {header['version']} is newer than this "
                              f"sparsenets reads ({VERSION}); upgrade sparsenets")
    header.setdefault("structured", {})
    for section in (*SECTIONS, "structured"):
        if not isinstance(header.get(section), dict):
            raise CheckpointError(f"{path}: damaged header: {section!r} must be an object, "
                                  f"got {type(header.get(section)).__name__}")
    for key, info in header["tensors"].items():
        try:
            if describe(info)[2].startswith("masked-"):
                _check_mask_key(header["tensors"], info)
        except ValueError as err:
            raise CheckpointError(f"{path}: damaged header: tensor {key!r}: {err}") from None
    return header, tensors


def _check_mask_key(descriptors: dict[str, Any], info: dict[str, Any]) -> None:
    """A tensor stored under another's mask names a bool tensor of its shape, itself stored whole."""
    key = info.get("mask")
    target = descriptors.get(key) if isinstance(key, str) else None
    if not isinstance(target, dict) or target.get("dtype") != "bool" or target.get("shape") != info["shape"] \
            or not isinstance(target.get("encoding"), str) or target["encoding"].startswith("masked-"):
        raise ValueError(f"'mask' must name a stored bool tensor of shape {info['shape']}, got {key!r}")


# ---- load ----------------------------------------------------------------------------------------------


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``: masks re-attached, compressed layers rebuilt.

    ``model`` is the dense architecture to fill in (an instance, which is filled in place, or a
    function building one); it is needed only for models that are neither built-in nor an
    ``nn.Sequential`` of torch layers. Layer sizes changed by ``compress`` are restored from the
    file, and so are dtypes: every tensor comes back in the dtype it was saved in (a float16 or
    bfloat16 checkpoint loads as float16 or bfloat16, even into a float32 ``model``).

    Train/eval mode: a model instance you pass keeps its own flags, module by module (a model
    in eval mode stays in eval mode); a model built by ``load`` (from the file, or by the
    function you pass) comes back in the mode it was saved in. Modules ``load`` adds (mask
    parametrizations, sparse kernel layers) take the mode of the module they sit in or replace.

    Raises :class:`CheckpointError` naming the file when it is damaged, changed after saving, or
    does not fit the model.
    """
    path = Path(path)
    header, stored = read_checkpoint(path)
    skeleton = A.given_model(model) if model is not None else _build(header, path)
    modes = _modes(skeleton) if isinstance(model, nn.Module) else None  # the caller's model keeps its mode
    try:
        skeleton = _structured_layers(skeleton, header)
        _check_fits(skeleton, header)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the file does not fit the model it is loaded into: {err}") from None
    try:
        state, structure = _decode_all(header, stored)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: damaged structure: {err}") from None
    try:
        return _rebuild(skeleton, header, state, structure, modes)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the file does not fit the model it is loaded into: {err}") from None


def _build(header: dict, path: Path) -> nn.Module:
    """The dense model the file describes, once its size (built on the meta device first) is sane."""
    architecture = header["architecture"]
    try:
        with torch.device("meta"):
            probe = A.build_architecture(architecture)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: can't build the model it describes: {err}") from None
    if probe is None:
        raise CheckpointError(f"{path} holds a {architecture.get('class', 'model')} that can't be rebuilt from "
                              f"the file alone: pass load(path, model=<the dense model, or a function building it>)")
    size = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    file_size = path.stat().st_size
    if size > max(SMALL_MODEL_BYTES, EXPANSION_LIMIT * file_size):
        raise CheckpointError(f"{path}: describes a model of {size / 1e9:.2f} GB in a file of {file_size:,} bytes, "
                              f"more than {EXPANSION_LIMIT} times its size; if that is right, build the model "
                              f"yourself and pass load(path, model=...)")
    built = A.build_architecture(architecture)
    assert built is not None  # the probe was built from the same description
    return built


def _structured_layers(model: nn.Module, header: dict) -> nn.Module:
    """``model`` with the structured layers the file holds in place of its dense ones.

    Only classes of :func:`~sparsenets.formats.structured_classes` are built, each first on the
    meta device, and only when its parameters have exactly the shapes the file stores: a forged
    header can't make ``load`` allocate more than the file describes.
    """
    from ..formats import structured_classes

    classes = structured_classes()
    for path, spec in header["structured"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in classes or not isinstance(spec.get("init"), dict):
            raise ValueError(f"'{path}': not a structured layer sparsenets builds: {spec!r}")
        cls, init = classes[spec["kind"]], _unplain_tree(spec["init"])
        current = _find(model, path)
        if type(current) is cls and _plain_tree(cast(Any, current).init_args()) == spec["init"]:
            continue  # the caller's model already has it
        with torch.device("meta"):
            probe = cls(**init)
        for name, tensor in probe.state_dict().items():
            key = f"{path}.{name}" if path else name
            info = header["tensors"].get(key) or header["tensors"].get(header["aliases"].get(key, ""))
            if info is None or tuple(info["shape"]) != tuple(tensor.shape):
                raise ValueError(f"'{key}': the structured layer {spec['kind']}({init}) has shape "
                                 f"{tuple(tensor.shape)}, the file {None if info is None else tuple(info['shape'])}")
        layer = cls(**init)
        if not path:
            return layer
        model.set_submodule(path, layer)
    return model


def _plain_tree(value: Any) -> Any:
    """Constructor arguments as JSON values; nested dicts (a wrapped layer's description) kept."""
    if isinstance(value, dict):
        return {"dict": {str(k): _plain_tree(v) for k, v in value.items()}}
    return A.plain(value)


def _unplain_tree(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"dict"} and isinstance(value["dict"], dict):
        return {k: _unplain_tree(v) for k, v in value["dict"].items()}
    return A.unplain(value)


def _resizable(header: dict, module_path: str) -> bool:
    return module_path in header["replaced"] or bool(header["records"].get(module_path, {}).get("resized"))


def _check_fits(model: nn.Module, header: dict) -> None:
    """Every tensor the file claims fits ``model``: same shape, or no larger in any dimension for
    layers compress cut down. Checked on the descriptors, before anything is decoded."""
    for key, info in header["tensors"].items():
        claimed = tuple(info["shape"])
        module_path, _, name = key.rpartition(".")
        module = _find(model, module_path)
        current = module._parameters.get(name, module._buffers.get(name))
        have = "nothing" if current is None else f"shape {tuple(current.shape)}"
        if current is not None and tuple(current.shape) == claimed:
            continue
        if _resizable(header, module_path) and _no_larger(module, current, claimed):
            continue
        raise ValueError(f"'{key}' has {have} in the model but shape {claimed} in the file")
    for key, target in header["aliases"].items():
        if target not in header["tensors"]:
            raise ValueError(f"'{key}' is tied to '{target}', which the file does not hold")


def _no_larger(module: nn.Module, current: Tensor | None, claimed: tuple[int, ...]) -> bool:
    """Compress only cuts tensors down (or adds a bias no longer than the weight's side)."""
    if current is not None:
        return len(claimed) == current.dim() and all(c <= d for c, d in zip(claimed, current.shape))
    sides = [d for t in module._parameters.values() if t is not None for d in t.shape]
    return len(claimed) == 1 and bool(sides) and claimed[0] <= max(sides)


def _decode_all(header: dict, stored: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    state: dict[str, Tensor] = {}
    structure: dict[str, Tensor] = {}
    tensors = header["tensors"]
    masked = {k for k, info in tensors.items() if info["encoding"].startswith("masked-")}
    for key in sorted(tensors, key=lambda k: k in masked):  # masks before the tensors stored under them
        info = tensors[key]
        parts = {name.removeprefix(key).removeprefix("::"): t for name, t in stored.items()
                 if name == key or name.startswith(f"{key}::")}
        given = state[info["mask"]] if key in masked else None
        state[key], mask = decode(info, parts, given)
        if mask is not None:
            structure[key] = mask
    for key, target in header["aliases"].items():
        state[key] = state[target]
    return state, structure


# ---- rebuild -------------------------------------------------------------------------------------------


def _rebuild(model: nn.Module, header: dict, state: dict[str, Tensor], structure: dict[str, Tensor],
             modes: dict[str, bool] | None = None) -> nn.Module:
    """``model`` filled in from the file; ``modes`` (train flags by module path) override the saved ones."""
    for path, attributes in header["attributes"].items():
        module = _find(model, path)
        for key, value in attributes.items():
            setattr(module, key, A.unplain(value))
    modes = _modes(model) if modes is None else modes  # the saved flags, when no others are given
    rebuilt = _fill(model, header, state, structure)
    _set_modes(rebuilt, modes)
    return rebuilt


def _fill(model: nn.Module, header: dict, state: dict[str, Tensor], structure: dict[str, Tensor]) -> nn.Module:
    replaced, records = header["replaced"], header["records"]
    for path in replaced:  # the dense layer takes the sizes of the sparse one
        module = _find(model, path)
        for key, value in records[path]["origin"]["init"].items():
            if key != "bias" and key in vars(module):
                setattr(module, key, A.unplain(value))
    _fit_tensors(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for path, record in records.items():
        if path not in replaced:
            set_record(_find(model, path), **record)
    for path, spec in replaced.items():
        layer = A.sparse_layer(_find(model, path), spec, structure[f"{path}.weight" if path else "weight"])
        set_record(layer, **records[path])
        if not path:
            return layer
        model.set_submodule(path, layer)
    for key, pattern in header["masks"].items():
        module_path, _, name = key.rpartition(".")
        attach(_find(model, module_path), name, structure[key], pattern)
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {path: module.training for path, module in model.named_modules()}


def _set_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Each module's train flag from ``modes`` by path; a module not in it takes its parent's."""
    parent_mode = {"": modes.get("", model.training)}
    for path, module in model.named_modules():
        parent = path.rpartition(".")[0]
        module.training = modes.get(path, parent_mode.get(parent, parent_mode[""]))
        parent_mode[path] = module.training


def _find(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"the model has no submodule '{path}'") from None


def _fit_tensors(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give each tensor the shape and dtype it has in the file (``_check_fits`` allowed the shape)."""
    for key, tensor in state.items():
        module_path, _, name = key.rpartition(".")
        module = _find(model, module_path)
        current = module._parameters.get(name, module._buffers.get(name))
        if current is not None and current.shape == tensor.shape and current.dtype == tensor.dtype:
            continue
        fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device=current.device if current is not None else "cpu")
        if name in module._buffers:
            module._buffers[name] = fresh
        elif name in module._parameters:
            requires_grad = current.requires_grad if current is not None else True
            module._parameters[name] = nn.Parameter(fresh, requires_grad=requires_grad and tensor.is_floating_point())


__all__ = ["FORMAT", "VERSION", "load", "read_checkpoint", "save"]
