"""``report``: per-layer sparsity, nonzeros, bytes and FLOPs, as a table or a dict.

A weight shared by two layers (GPT-2's ``lm_head`` is the token embedding) is one tensor: both
rows show it, but totals count its elements once (the second row says ``tied_to`` the first).
FLOPs count every use; an expert bank's rows count the routed share (top-k of the experts).

After the table, ``uncovered`` lists every parameter a default config leaves dense, one line
per parameter group with the reason (embeddings are opt-in, norms and biases are 1-D, routers
stay dense, ...), so what sparsenets does not prune is never silent.

A structured layer (low-rank, Monarch, a MoRe-adapted layer) is one row: ``format`` names its
structure, ``nonzeros`` counts the parameters it stores, ``density`` is that over the dense
weight's size, and its FLOPs are two per stored weight and token, as for sparse layers.

``bytes`` is what a layer's weight takes stored: a quantized layer's packed codes and scales
(its ``storage_bytes()``), else its stored values at the weight's element size (nonzeros ×
itemsize: a float16 weight takes 2 bytes per kept weight). The indices or mask bits that say
where the kept values sit are not counted, nor are biases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import batches as B
from .activations import input_density
from .formats import is_structured
from .gemm import is_experts, is_hf_conv1d
from .layers.block_sparse import BlockSparseConv1d, BlockSparseConv2d, BlockSparseLinear
from .masking import get_mask, parametrization_list
from .targets import Uncovered, default_targets, is_layer, uncovered, weight_names


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]
    pattern: str
    density: float
    nonzeros: int
    numel: int
    dense_flops: int | None  # per sample: 2 multiply-adds per weight use
    sparse_flops: int | None
    bytes: int = 0  # the weight stored: kept values × element size (packed codes for a quantized layer)
    input_density: float | None = None  # nonzero fraction of the layer's input activations (needs data)
    tied_to: str | None = None  # the row that already counts this shared weight in the totals


@dataclass
class Report:
    rows: list[LayerRow]
    uncovered: list[Uncovered] = field(default_factory=list)  # what a default config leaves dense, and why

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows if r.tied_to is None)

    @property
    def nonzeros(self) -> int:
        return sum(r.nonzeros for r in self.rows if r.tied_to is None)

    @property
    def density(self) -> float:
        return self.nonzeros / max(self.numel, 1)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows if r.tied_to is None)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def _flops(self, key: str) -> int | None:
        values = [getattr(r, key) for r in self.rows]
        return None if any(v is None for v in values) else sum(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) | {"shape": list(r.shape)} for r in self.rows],
            "total": {"numel": self.numel, "nonzeros": self.nonzeros, "density": self.density,
                      "sparsity": self.sparsity, "bytes": self.bytes, "dense_flops": self._flops("dense_flops"),
                      "sparse_flops": self._flops("sparse_flops")},
            "uncovered": [asdict(u) for u in self.uncovered],
        }

    def __str__(self) -> str:
        header: tuple[str, ...] = ("layer", "shape", "format", "density", "nonzeros", "bytes", "dense FLOPs",
                                   "sparse FLOPs")
        body: list[tuple[str, ...]] = [
            (_label(r), "x".join(map(str, r.shape)), r.pattern, f"{r.density:.3f}", f"{r.nonzeros:,}",
             _human_bytes(r.bytes), _human(r.dense_flops), _human(r.sparse_flops)) for r in self.rows]
        body.append(("total", "", "", f"{self.density:.3f}", f"{self.nonzeros:,}", _human_bytes(self.bytes),
                     _human(self._flops("dense_flops")), _human(self._flops("sparse_flops"))))
        if any(r.input_density is not None for r in self.rows):  # measured only when data was given
            header += ("input density",)
            body = [row + ("-" if r.input_density is None else f"{r.input_density:.3f}",)
                    for row, r in zip(body, self.rows)] + [body[-1] + ("",)]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in [header, *body]]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        if self.uncovered:
            lines.append("not pruned by default:")
            lines += [f"  {u.name}{f' (x{u.count})' if u.count > 1 else ''}: {u.reason}" for u in self.uncovered]
        return "\n".join(lines)

    __repr__ = __str__


def _label(row: LayerRow) -> str:
    return row.name if row.tied_to is None else f"{row.name} (= {row.tied_to})"


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


BLOCK_SPARSE = (BlockSparseLinear, BlockSparseConv1d, BlockSparseConv2d)  # what sparse training's fast mode trains
_CONVS = (nn.modules.conv._ConvNd, BlockSparseConv1d, BlockSparseConv2d)


def _uses_per_sample(model: nn.Module, layers: list[tuple[str, nn.Module]], data: Iterable | None) -> dict[str, float]:
    """How often each weight is applied per sample (tokens, or conv output positions)."""
    if data is None:
        return {name: 1.0 for name, m in layers if not isinstance(m, (*_CONVS, nn.Embedding))}
    uses: dict[str, float] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.Embedding) or not isinstance(out, torch.Tensor):  # e.g. PackedSequence
                return
            if isinstance(module, _CONVS):
                uses[name] = out[0, 0].numel()  # positions per sample
            else:  # tokens per sample
                uses[name] = out.numel() / (batch_size * out.shape[-1])
        return record

    batch = B.take(data, 1)[0]
    inputs = batch if isinstance(batch, (dict, torch.Tensor)) else batch[0]
    batch_size = (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).shape[0]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    modes = {m: m.training for m in model.modules()}
    try:  # eval mode and a forked RNG: counting must not move BatchNorm statistics or dropout draws
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            B.run(model.eval(), B.to_device(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for name, module in layers:  # MHA applies out_proj functionally, so its hook never fires
        if isinstance(module, nn.MultiheadAttention) and name in uses:
            uses[f"{name}.out_proj"] = uses[name]
    return uses


def report(model: nn.Module, data: Iterable | None = None) -> Report:
    """Per-layer report of every layer sparsenets can sparsify, masked or not.

    FLOPs are per sample. Without ``data`` they are counted for one token through
    Linear-like layers and left out ('-') for convolutions; with ``data`` (an iterable of
    batches; one is used) they count the real tokens and output positions, and each row
    also shows the density (nonzero fraction) of the layer's input activations on that batch.
    """
    structured = [(n, m) for n, m in model.named_modules() if is_structured(m)]
    inside = {id(c) for _, m in structured for c in m.modules() if c is not m}  # a MoRe layer's base and adapter
    layers = [(n, m) for n, m in model.named_modules()
              if (is_layer(m) or isinstance(m, BLOCK_SPARSE) or is_structured(m)) and id(m) not in inside]
    uses = _uses_per_sample(model, layers, data)
    inputs = {} if data is None else input_density(model, layers, data)
    rows = []
    first_row: dict[int, str] = {}  # id of the stored tensor -> the row that counts it
    for name, module in layers:
        for row_name, weight, pattern, stored in _weights(name, module):
            nonzeros = cast(Any, module).num_parameters() if is_structured(module) else int(torch.count_nonzero(weight))
            shape = tuple(weight.t().shape) if is_hf_conv1d(module) else tuple(weight.shape)
            n_uses = uses.get(name)
            if n_uses is not None and is_experts(module):
                n_uses *= _routed_share(model, module)
            rows.append(LayerRow(
                name=row_name,
                shape=shape,
                pattern=pattern,
                density=nonzeros / weight.numel(),
                nonzeros=nonzeros,
                numel=weight.numel(),
                dense_flops=None if n_uses is None else int(2 * weight.numel() * n_uses),
                sparse_flops=None if n_uses is None else int(2 * nonzeros * n_uses),
                bytes=_bytes(module, weight, nonzeros),
                input_density=inputs.get(name),
                tied_to=first_row.get(id(stored)),
            ))
            first_row.setdefault(id(stored), row_name)
    block_values = {id(m.values) for _, m in layers if isinstance(m, BLOCK_SPARSE)}
    factors = {id(p) for _, m in structured for p in [*m.parameters(), *m.buffers()]}
    return Report(rows, uncovered(model, default_targets(model) | block_values | factors))


def _weights(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """(row name, weight as the forward sees it, pattern, stored tensor) of each weight of a layer."""
    if is_structured(module):  # factors: the row counts the parameters stored, the weight is their product
        layer: Any = module
        stored = next(iter([*module.parameters(), *module.buffers()]))
        yield name or "(model)", layer.dense_weight().detach(), layer.format_name(), stored
        return
    if isinstance(module, BLOCK_SPARSE):
        r, c = module.block
        yield name or "(model)", module.dense_weight().detach(), f"block:{r}x{c}", module.values
        return
    for param in weight_names(module):
        mask = get_mask(module, param)
        row_name = (name or "(model)") if param == "weight" else f"{name}.{param}".lstrip(".")
        pattern = mask.pattern if mask is not None else "dense"
        yield row_name, getattr(module, param).detach(), pattern, _stored(module, param)


def _bytes(module: nn.Module, weight: torch.Tensor, nonzeros: int) -> int:
    """The weight's stored size: a layer's own ``storage_bytes()`` (packed codes), else kept values × itemsize."""
    storage = getattr(module, "storage_bytes", None)
    return int(storage()) if is_structured(module) and callable(storage) else nonzeros * weight.element_size()


def _routed_share(model: nn.Module, experts: nn.Module) -> float:
    """top-k / experts: the share of an expert bank's weights one token goes through."""
    for block in model.modules():
        if getattr(block, "experts", None) is experts:
            k = getattr(block, "top_k", None) or getattr(getattr(block, "gate", None), "top_k", None)
            if isinstance(k, int):
                return k / experts.num_experts
    return 1.0


def _stored(module: nn.Module, param: str) -> torch.Tensor:
    """The tensor a weight is stored in (under a mask, the parametrization's original)."""
    if parametrize.is_parametrized(module, param):
        return parametrization_list(module, param).original
    return getattr(module, param)
