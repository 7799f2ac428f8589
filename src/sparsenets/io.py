"""Sparse checkpoints: ``save(model, path)`` and ``load(path)``, one safetensors file, no pickle.

What the file holds:

- **tensors**, each in the smallest of four encodings: ``dense``; ``bitmask`` (kept values
  plus one bit per element); ``csr`` (kept values, row pointers, column indices); ``blocks``
  (the values of kept ``r × c`` blocks plus one bit per block). Masked, compressed and plain
  models all store their weights this way, so only kept values take space.
- **structure** (JSON in the safetensors metadata): per tensor its encoding, shape and dtype;
  the masks to re-attach (with their pattern); the layers that ``compress`` replaced by
  sparse kernels; every module's simple attributes (sizes, head counts, flags), so a model
  cut down by ``compress`` rebuilds with its new sizes.
- **architecture**: how to build the model again without pickle: a built-in model by name
  (``architecture={"name": "conv4", "input_shape": ..., "num_classes": ...}``), a torch
  layer or ``nn.Sequential`` of torch layers described layer by layer, or nothing, in which case
  ``load(path, model=...)`` takes the model (or a function that builds it) to fill in.
- **integrity**: a sha256 of the tensor payload; any mismatch, truncation or damaged header
  is an error that names the file.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import SparsityConfig
from .errors import CheckpointError
from .masking import attach, finalize_, masks
from .patterns import Block, PatternError, parse_pattern
from .gemm import block_keep, expand_blocks, is_hf_conv1d

FORMAT = "sparsenets-checkpoint"
VERSION = 1
HF_CONV1D = "transformers.pytorch_utils.Conv1D"



# ---- describing layers -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON value for a simple attribute (tuples tagged so they come back as tuples), or raise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    raise TypeError(type(value).__name__)


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_unplain(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def _class_name(module: nn.Module) -> str | None:
    """The name a module's class is rebuilt from: torch.nn layers and HF Conv1D only."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if is_hf_conv1d(module):
        return HF_CONV1D
    return None


def _resolve(name: str) -> type:
    """The class for a name written by :func:`_class_name`; nothing else can be named."""
    if name.startswith("torch.nn.") and "." not in name[len("torch.nn."):]:
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
                init[param.name] = _plain(getattr(module, param.name))
            except TypeError:
                return None
        elif param.default is param.empty:
            return None
    return {"class": name, "init": init}


def describe_sequential(model: nn.Module) -> dict[str, Any] | None:
    """A nested description of an ``nn.Sequential`` of describable layers, or None."""
    if type(model) is not nn.Sequential:
        return _origin(model) or describe_layer(model)
    children = {}
    for name, child in model.named_children():
        children[name] = describe_sequential(child)
        if children[name] is None:
            return None
    return {"class": "torch.nn.Sequential", "children": children}


def build_described(spec: dict[str, Any]) -> nn.Module:
    if spec["class"] == "torch.nn.Sequential":
        from collections import OrderedDict

        return nn.Sequential(OrderedDict((k, build_described(v)) for k, v in spec["children"].items()))
    init = {k: _unplain(v) for k, v in spec["init"].items()}
    return _resolve(spec["class"])(**init)


def _origin(module: nn.Module) -> dict[str, Any] | None:
    """What a sparse layer made by ``compress`` replaced (its dense description)."""
    return getattr(module, "sparsenets_origin", None) if _is_replacement(module) else None


def _is_replacement(module: nn.Module) -> bool:
    return hasattr(module, "dense_weight") and "sparsenets_origin" in vars(module)


def _attributes(module: nn.Module) -> dict[str, Any]:
    """A module's public attributes of plain types: sizes, counts, flags (private ones belong to
    torch or the library that built the module, and the constructor sets them)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "sparsenets_origin":
            continue
        try:
            out[key] = _plain(value)
        except TypeError:
            continue
    return out


# ---- tensor encodings --------------------------------------------------------------------------------


def _index_dtype(limit: int) -> torch.dtype:
    return torch.int16 if limit <= 2**15 - 1 else torch.int32 if limit <= 2**31 - 1 else torch.int64


def _pack(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def _unpack(bits: Tensor, count: int) -> Tensor:
    unpacked = np.unpackbits(bits.numpy(), count=count)
    return torch.from_numpy(unpacked.astype(bool))


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], int(np.prod(shape[1:]))




def encode(tensor: Tensor, mask: Tensor | None = None, block: tuple[int, int] | None = None
           ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The smallest encoding of ``tensor`` keeping the entries of ``mask`` (default: its nonzeros).

    Returns the descriptor (JSON) and the parts to store, keyed by suffix.
    """
    tensor = tensor.detach().cpu().contiguous()
    info = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    options = [("dense", {"": tensor.clone()})]
    if tensor.dim() >= 1 and tensor.is_floating_point() and tensor.numel():
        keep = (tensor != 0) if mask is None else mask.detach().cpu().to(torch.bool).reshape(tensor.shape)
        flat_keep = keep.reshape(-1)
        values = tensor.reshape(-1)[flat_keep]
        options.append(("bitmask", {"values": values, "bits": _pack(keep)}))
        if tensor.dim() >= 2:
            rows, cols = _grid(tensor.shape)
            keep2d = keep.reshape(rows, cols)
            counts = keep2d.sum(dim=1)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(_index_dtype(values.numel()))
            col = keep2d.nonzero()[:, 1].to(_index_dtype(cols))
            options.append(("csr", {"values": values, "crow": crow, "col": col}))
            # whole rows (pruned neurons) and whole columns (unused inputs) are blocks too
            for shape in dict.fromkeys(s for s in (block, (1, cols), (rows, 1)) if s is not None):
                if shape[0] > rows or shape[1] > cols:
                    continue
                blocks = block_keep(keep2d, shape)
                inside = expand_blocks(blocks, shape, (rows, cols)).reshape(-1)
                if mask is None or torch.equal(inside, flat_keep):  # a given mask must come back exactly
                    options.append((f"blocks:{shape[0]}x{shape[1]}",
                                    {"values": tensor.reshape(-1)[inside], "bits": _pack(blocks)}))
    name, parts = min(options, key=lambda o: sum(t.numel() * t.element_size() for t in o[1].values()))
    info["encoding"] = name
    return info, parts


def _expect(part: Tensor, numel: int, what: str) -> Tensor:
    if part.dim() != 1 or part.numel() != numel:
        raise ValueError(f"{what} has {part.numel()} entries, the header implies {numel}")
    return part


def decode(info: dict[str, Any], parts: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The tensor and its mask (None for dense) from :func:`encode`'s output; raises ValueError
    when the parts don't have the sizes the descriptor implies."""
    shape = tuple(int(d) for d in info["shape"])
    dtype = getattr(torch, info["dtype"])
    numel = int(np.prod(shape))
    encoding = info["encoding"]
    if encoding == "dense":
        return _expect(parts[""].reshape(-1), numel, "dense tensor").reshape(shape), None
    values = parts["values"]
    if encoding == "bitmask":
        keep = _unpack(_expect(parts["bits"], -(-numel // 8), "bitmask"), numel)
    elif encoding == "csr":
        rows, cols = _grid(shape)
        crow = _expect(parts["crow"], rows + 1, "row pointers").long()
        col = _expect(parts["col"], values.numel(), "column indices").long()
        if int(crow[0]) != 0 or int(crow[-1]) != values.numel() or bool((crow.diff() < 0).any()) or (
                col.numel() and not (0 <= int(col.min()) and int(col.max()) < cols)):
            raise ValueError("CSR indices out of range")
        keep = torch.zeros(rows, cols, dtype=torch.bool)
        keep[torch.repeat_interleave(torch.arange(rows), crow.diff()), col] = True
        keep = keep.reshape(-1)
    elif encoding.startswith("blocks:"):
        r, c = (int(side) for side in encoding.removeprefix("blocks:").split("x"))
        rows, cols = _grid(shape)
        grid = (-(-rows // r), -(-cols // c))
        bits = _expect(parts["bits"], -(-grid[0] * grid[1] // 8), "block bitmap")
        keep = expand_blocks(_unpack(bits, grid[0] * grid[1]).reshape(grid), (r, c), (rows, cols)).reshape(-1)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    _expect(values, int(keep.sum()), "kept values")
    dense = torch.zeros(numel, dtype=dtype)
    dense[keep] = values.to(dtype)
    return dense.reshape(shape), keep.reshape(shape)


# ---- what a model holds ---------------------------------------------------------------------------------


def _block_hint(pattern: str | None) -> tuple[int, int] | None:
    if not pattern:
        return None
    try:
        parsed = parse_pattern(pattern)
    except PatternError:
        return None
    return (parsed.r, parsed.c) if isinstance(parsed, Block) else None


def _replacement_state(path: str, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """A sparse layer's weight as the dense layer it replaced would hold it, with its structure."""
    origin = module.sparsenets_origin
    weight = module.dense_weight().detach()
    mask = module.mask() if hasattr(module, "mask") else _structure_mask(module)
    if origin["class"] == HF_CONV1D:
        weight, mask = weight.t(), mask.t()
    prefix = f"{path}." if path else ""
    state = {f"{prefix}weight": weight}
    if getattr(module, "bias", None) is not None:
        state[f"{prefix}bias"] = module.bias.detach()
    spec = {"kind": type(module).__name__, "origin": origin}
    if hasattr(module, "block"):
        spec["block"] = list(module.block)
    return state, {f"{prefix}weight": mask}, spec


def _structure_mask(module: nn.Module) -> Tensor:
    """Which entries a block-sparse layer stores: every element of its kept blocks."""
    from .kernels import scatter_blocks

    ones = torch.ones_like(module.values, dtype=torch.float32)
    mask = scatter_blocks(ones, module.layout.to(ones.device)) != 0
    return mask.reshape(module.dense_weight().shape)


def _collect(model: nn.Module) -> dict[str, Any]:
    """Everything save writes, from a masked, compressed or plain model."""
    plain = finalize_(copy.deepcopy(model))
    mask_of = {f"{m}.{t}" if m else t: (mask.mask, mask.pattern) for m, _, t, mask in masks(model)}
    state: dict[str, Tensor] = {}
    hints: dict[str, tuple[Tensor | None, tuple[int, int] | None]] = {}
    replaced, attributes, skip = {}, {}, []
    for path, module in plain.named_modules():
        if any(path.startswith(p) for p in skip):
            continue
        if _is_replacement(module):
            part, structure, spec = _replacement_state(path, module)
            state.update(part)
            for key, mask in structure.items():
                hints[key] = (mask, tuple(spec["block"]) if "block" in spec else None)
            replaced[path] = spec
            skip.append(f"{path}." if path else "")
            continue
        attributes[path] = _attributes(module)
    for key, tensor in plain.state_dict().items():
        if not any(key.startswith(p) for p in skip):
            state[key] = tensor
    for key, (mask, pattern) in mask_of.items():
        hints[key] = (mask, _block_hint(pattern))
    for path, module in plain.named_modules():
        hint = _block_hint(getattr(module, "sparsenets_pattern", None))
        key = f"{path}.weight" if path else "weight"
        if hint and key in state and key not in hints:
            hints[key] = (None, hint)
    return {"plain": plain, "state": state, "hints": hints, "replaced": replaced, "attributes": attributes,
            "masks": {k: p for k, (_, p) in mask_of.items()}}


# ---- save ----------------------------------------------------------------------------------------------


def _architecture(plain: nn.Module, architecture: dict[str, Any] | None) -> dict[str, Any]:
    spec = architecture or getattr(plain, "sparsenets_architecture", None)
    if spec is not None:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"architecture must be a dict with a model 'name' (and its options), got {spec!r}")
        try:
            return {"kind": "builtin", "spec": json.loads(json.dumps(spec))}
        except TypeError as err:
            raise ValueError(f"architecture must hold plain values (numbers, strings, lists): {err}") from None
    layers = describe_sequential(plain)
    if layers is not None:
        return {"kind": "layers", "layers": layers}
    cls = type(plain)
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save(model: nn.Module, path: str | os.PathLike, *, architecture: dict[str, Any] | None = None,
         config: SparsityConfig | dict | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (masked, compressed by :func:`~sparsenets.compress` or plain) to ``path``.

    Args:
        architecture: for built-in models, ``{"name": ..., "input_shape": ..., "num_classes": ...,
            **options}`` as ``sparsenets.experiments.models.build_model`` takes them. Not needed
            for an ``nn.Sequential`` of torch layers; other models are loaded with ``model=``.
        config: the sparsity config, kept in the file for reference.
        metadata: any JSON-able values to keep alongside (accuracy, run name, ...).

    The file is written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(config, SparsityConfig):
        config = config.to_dict()
    collected = _collect(model)
    tensors, descriptors, aliases, seen = {}, {}, {}, {}
    for key, tensor in collected["state"].items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if identity in seen:  # tied weights: stored once
            aliases[key] = seen[identity]
            continue
        if identity is not None:
            seen[identity] = key
        mask, block = collected["hints"].get(key, (None, None))
        info, parts = encode(tensor, mask, block)
        descriptors[key] = info
        for suffix, part in parts.items():
            tensors[f"{key}::{suffix}" if suffix else key] = part.contiguous()
    header = {
        "format": FORMAT, "version": VERSION, "torch": torch.__version__,
        "architecture": _architecture(collected["plain"], architecture),
        "tensors": descriptors, "aliases": aliases, "masks": collected["masks"],
        "replaced": collected["replaced"], "attributes": collected["attributes"],
        "config": config, "metadata": metadata or {},
    }
    try:
        text = json.dumps(header)
    except TypeError as err:
        raise ValueError(f"metadata and config must hold plain JSON values: {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        temporary = handle.name
    try:
        save_file(tensors, temporary, metadata={"sparsenets": text, "sha256": _digest(tensors)})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ---- load ----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the stored tensors of a checkpoint, verified against its checksum."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged header?): "
                              f"{err}") from None
    if "sparsenets" not in meta or "sha256" not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not a sparsenets checkpoint (no sparsenets metadata)")
    try:
        header = json.loads(meta["sparsenets"])
    except ValueError as err:
        raise CheckpointError(f"{path}: damaged header: its sparsenets metadata is not valid JSON ({err})") from None
    if header.get("format") != FORMAT or not isinstance(header.get("version"), int):
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}")
    if header["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {header['version']} is newer than this "
                              f"sparsenets reads ({VERSION}); upgrade sparsenets")
    if _digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the tensor data was changed or damaged after saving")
    return header, tensors


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``: masks re-attached, compressed layers rebuilt.

    ``model`` is the dense architecture to fill in (an instance, which is filled in place, or a
    function building one); it is needed only for models that are neither built-in nor an
    ``nn.Sequential`` of torch layers. Layer sizes changed by ``compress`` are restored from the file.
    """
    header, stored = read_checkpoint(path)
    try:
        state, structure = _decode_all(header, stored)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: damaged structure: {err}") from None
    skeleton = _skeleton(header["architecture"], model, path)
    try:
        return _rebuild(skeleton, header, state, structure)
    except (KeyError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the file does not fit the model given to rebuild it: {err}") from None


def _decode_all(header: dict, stored: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    state, structure = {}, {}
    for key, info in header["tensors"].items():
        parts = {name.removeprefix(key).removeprefix("::"): t for name, t in stored.items()
                 if name == key or name.startswith(f"{key}::")}
        state[key], mask = decode(info, parts)
        if mask is not None:
            structure[key] = mask
    for key, target in header["aliases"].items():
        state[key] = state[target]
    return state, structure


def _skeleton(architecture: dict, model: nn.Module | Callable[[], nn.Module] | None, path: Path | str) -> nn.Module:
    if model is not None:
        built = model if isinstance(model, nn.Module) else model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model= must be an nn.Module or a function returning one, got {type(built).__name__}")
        return built
    kind = architecture.get("kind")
    if kind == "builtin":
        from .models import build_model

        spec = dict(architecture["spec"])
        return build_model(spec.pop("name"), spec.pop("input_shape"), spec.pop("num_classes"), **spec)
    if kind == "layers":
        return build_described(architecture["layers"])
    raise CheckpointError(f"{path} holds a {architecture.get('class', 'model')} that can't be rebuilt from the "
                          f"file alone: pass load(path, model=<the dense model, or a function building it>)")


def _rebuild(model: nn.Module, header: dict, state: dict[str, Tensor], structure: dict[str, Tensor]) -> nn.Module:
    replaced = header["replaced"]
    for path, attributes in header["attributes"].items():
        module = _find(model, path)
        for key, value in attributes.items():
            setattr(module, key, _unplain(value))
    for path, spec in replaced.items():  # the dense layer takes the sizes of the sparse one
        module = _find(model, path)
        for key, value in spec["origin"]["init"].items():
            if key != "bias" and key in vars(module):
                setattr(module, key, _unplain(value))
    _fit_shapes(model, state, replaced)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for path, spec in replaced.items():
        layer = _sparse_layer(_find(model, path), spec, structure[f"{path}.weight" if path else "weight"])
        layer.sparsenets_origin = spec["origin"]
        if not path:
            return layer
        model.set_submodule(path, layer)
    for key, pattern in header["masks"].items():
        module_path, _, name = key.rpartition(".")
        attach(_find(model, module_path), name, structure[key], pattern)
    return model


def _find(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"the model has no submodule '{path}'") from None


def _fit_shapes(model: nn.Module, state: dict[str, Tensor], replaced: dict) -> None:
    """Resize the tensors of layers that ``compress`` cut down (or replaced) to their saved shapes."""
    for key, tensor in state.items():
        module_path, _, name = key.rpartition(".")
        module = _find(model, module_path)
        current = module._parameters.get(name, module._buffers.get(name))
        if current is not None and current.shape == tensor.shape:
            continue
        if not (getattr(module, "sparsenets_resized", False) or module_path in replaced):
            have = "nothing" if current is None else f"shape {tuple(current.shape)}"
            raise ValueError(f"'{key}' has {have} in the model but shape {tuple(tensor.shape)} in the file")
        fresh = torch.empty(tensor.shape, dtype=tensor.dtype,
                            device=current.device if current is not None else "cpu")
        if name in module._parameters:
            requires_grad = current.requires_grad if current is not None else True
            module._parameters[name] = nn.Parameter(fresh, requires_grad=requires_grad)
        elif name in module._buffers:
            module._buffers[name] = fresh


def _sparse_layer(dense: nn.Module, spec: dict, mask: Tensor) -> nn.Module:
    """The sparse kernel ``compress`` chose, rebuilt from the loaded dense layer."""
    weight, bias = dense.weight.detach(), getattr(dense, "bias", None)
    if is_hf_conv1d(dense):
        weight, mask = weight.t(), mask.t()
    kind = spec["kind"]
    if kind == "CSRLinear":
        from .layers.csr import CSRLinear

        return CSRLinear.from_dense(weight, mask, bias)
    from .layers import block_sparse

    cls = getattr(block_sparse, kind, None)
    if kind == "BlockSparseLinear":
        return cls.from_dense(weight, mask, bias, tuple(spec["block"]))
    if kind in ("BlockSparseConv1d", "BlockSparseConv2d"):
        return cls.from_dense(dense, weight, mask, tuple(spec["block"]))
    raise ValueError(f"unknown sparse layer kind {kind!r}")
