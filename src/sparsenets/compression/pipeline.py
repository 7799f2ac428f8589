"""``compress``: turn a masked model into a smaller, faster one that computes the same outputs.

Three steps on a copy of the model, masks baked in:

1. **Shrink** (:mod:`.heads`, :mod:`.channels`): attention heads, neurons and channels that
   are entirely zero are cut out, with the inputs of the layers that read them.
2. **Choose kernels** (:mod:`.choose`): each remaining sparse layer becomes a block-sparse
   layer, a CSR layer or stays dense, whichever runs fastest on its shape.
3. **Check**: with an example input, the result must reproduce the masked model's outputs.
   If shrinking broke them, the model is compressed again without it; a sparse layer that
   breaks them goes back to dense (a warning says which).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import batches as B
from ..gemm import is_hf_conv1d
from ..io.architecture import describe_layer
from ..masking import finalize_, masks
from ..record import get_record, set_record
from . import choose as C
from .channels import ChannelGroup, feedforward_groups, graph_groups, shrink_group, traced_regions, usable_in
from .choose import LayerChoice
from .graph import Stream, shrink_stream, stream_groups
from .heads import shrink_heads
from .probe import probe
from .surgery import CONV_TYPES, dead_outputs, is_gemm_layer

__all__ = ["CompressReport", "LayerChoice", "compress"]

# Parents that read their children's weights directly instead of calling them (fast paths).
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
RTOL, ATOL = 1e-4, 1e-5  # float32 (and float64): sums taken in another order
# Half precisions round every product to 8 (bfloat16) or 11 (float16) bits: about their epsilon,
# relative to the output's scale, is what a kernel summing in another order may change.
TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
logger = logging.getLogger(__name__)


@dataclass
class CompressReport:
    """Attached to a compressed model as ``model.compress_report``; ``print()`` it for a table."""

    layers: list[LayerChoice] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # one line per layer or attention cut down
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"parameters: {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"  {line}" for line in self.removed]
        if self.layers:
            width = max(len(c.name) for c in self.layers)
            lines.append(f"{'layer':<{width}}  {'pattern':<14} {'shape':<18} {'density':>7}  {'kernel':<6}  "
                         f"timings (ms)")
            for c in self.layers:
                times = ", ".join(f"{k} {v:.3f}" for k, v in c.times_ms.items()) or c.how
                lines.append(f"{c.name:<{width}}  {c.pattern:<14} {str(c.shape):<18} {c.density:>7.3f}  "
                             f"{c.kind:<6}  {times}")
        lines += self.notes
        return "\n".join(lines)


def compress(model: nn.Module, example_input: Any = None, *, autotune: bool = True, shrink: bool = True,
             cache: str | None = None, verbose: bool = False) -> nn.Module:
    """A new model computing what the masked ``model`` computes, with its sparsity turned into speed.

    Args:
        model: a model with sparsenets masks (or any model: zero weights count as pruned).
            It is not changed.
        example_input: a batch as the model takes it (a tensor, an ``(inputs, targets)``
            tuple, or a dict of keyword inputs). It gives the shapes that kernels are timed on
            and the sizes behind ``Flatten``, and the result is checked against it. Without
            it, kernels follow a density rule for convolutions and are timed on one row for
            linear layers, and nothing is checked.
        autotune: time the candidate kernels of each layer (else use the density rule).
        shrink: physically remove zero neurons, channels and heads.
        cache: JSON file to keep autotune timings in between runs (default: the
            ``SPARSENETS_TUNE_CACHE`` environment variable, else in-process only).
        verbose: log the per-layer report (logger ``sparsenets.compression.pipeline``, level INFO).

    Returns:
        The compressed model, in eval mode, with ``compress_report`` (a :class:`CompressReport`).
        Its parameters still train; exact equality with the masked model holds in eval mode
        (constants folded through BatchNorm or Dropout assume eval behaviour).
    """
    disk = C.cache_path(cache)
    C.load_cache(disk)
    result, report, mismatch = _compress(model, example_input, autotune, shrink)
    if mismatch:  # shrinking broke the outputs (a model the tracing misread): do without it
        note = f"undid shrinking: the result did not reproduce the model's outputs ({mismatch})"
        warnings.warn(f"compress: {note}", stacklevel=2)
        result, report, _ = _compress(model, example_input, autotune, False)
        report.notes.insert(0, note)
    C.save_cache(disk)
    result.compress_report = report  # type: ignore[assignment]  # Module.__setattr__ accepts any value
    if verbose:
        logger.info("%s", report)
    return result


def _compress(model: nn.Module, example_input: Any, autotune: bool, shrink: bool
              ) -> tuple[nn.Module, CompressReport, str | None]:
    """One try: the model, its report, and how shrinking broke the outputs (None if it didn't)."""
    work = copy.deepcopy(model)
    patterns = {module: mask.pattern for _, module, name, mask in masks(work) if name == "weight"}
    finalize_(work).eval()
    report = CompressReport(params_before=_n_params(work))
    expected = None
    if example_input is not None:
        example_input = B.to_device(example_input, _device(work))
        with torch.no_grad():
            expected = B.run(work, example_input)
    shapes = probe(work, example_input) if example_input is not None else {}
    shared = _shared_modules(work, shapes)
    regions = list(traced_regions(work))
    if shrink:
        for line in shrink_heads(work, shared):  # a "kept: why" line is a note, not a removal
            (report.notes if "; kept:" in line else report.removed).append(line)
        _shrink_channels(work, regions, shapes, shared, report)
        if report.removed and (mismatch := _check(work, example_input, expected)):
            return work, report, mismatch
    swaps = _choose_kernels(work, patterns, shapes, shared | _read_as_tensors(work, regions), autotune, report)
    work = _apply(work, swaps, lambda model: _check(model, example_input, expected), report)
    report.params_after = _n_params(work)
    return work, report, None


def _shrink_channels(work: nn.Module, regions: list, shapes: dict, shared: set[int],
                     report: CompressReport) -> None:
    """Cut every channel group; then a note for each layer that still has zero outputs, saying why."""
    stopped: dict[str, str] = {}
    groups: list[ChannelGroup | Stream] = list(feedforward_groups(work))
    for prefix, root, graph in regions:
        groups += graph_groups(prefix, root, graph, shapes, shared, stopped)
        groups += stream_groups(prefix, root, graph, shapes, usable_in(root, graph, shared), stopped)
    explained = set()
    for group in groups:
        if any(id(m) in shared for m in group.modules()):
            stopped[group.name] = "a layer of its group is shared or called twice"
            continue
        done = shrink_group(group) if isinstance(group, ChannelGroup) else shrink_stream(group)
        if done.removed:
            report.removed.append(done.removed)
        report.notes += done.kept
        writers = [group.producer, group.gate] if isinstance(group, ChannelGroup) else group.producers.values()
        explained |= {id(m) for m in writers}
    report.notes += _unexplained_zeros(work, explained, stopped)


def _unexplained_zeros(work: nn.Module, explained: set[int], stopped: dict[str, str]) -> list[str]:
    """'name: N zero outputs kept: why' for layers with zero rows no group accounted for."""
    notes = []
    for name, module in work.named_modules():
        if id(module) in explained or not is_gemm_layer(module):
            continue
        dead = int(dead_outputs(module).sum())
        why = stopped.get(name, "no channel search reached their readers (not traceable by torch.fx "
                                "and not a known block layout, or they are the model's outputs)")
        if dead and why:  # "": the model's own outputs, kept by definition
            notes.append(f"{name}: {dead} zero outputs kept: {why}")
    return notes


def _check(model: nn.Module, example_input: Any, expected: Any) -> str | None:
    """None when ``model`` reproduces ``expected`` on the example input (or there is none)."""
    if example_input is None:
        return None
    try:
        with torch.no_grad():
            return _compare(expected, B.run(model, example_input))
    except Exception as err:  # noqa: BLE001 - any failure of the result is a failed check
        return f"it raised {type(err).__name__}: {err}"


Swap = tuple[str, nn.Module, nn.Module, LayerChoice]  # name, dense layer, sparse layer, record


def _choose_kernels(work: nn.Module, patterns: dict[nn.Module, str], shapes: dict, protected: set[int],
                    autotune: bool, report: CompressReport) -> list[Swap]:
    """Pick each masked layer's kernel (recorded in ``report``); returns the layers to swap."""
    swaps = []
    for name, module in list(work.named_modules()):
        if not (isinstance(module, (nn.Linear, *CONV_TYPES)) or is_hf_conv1d(module)):
            continue
        if module in patterns:
            set_record(module, pattern=patterns[module])  # lets save() pick the block encoding
        elif bool(module.weight.detach().all()):
            continue  # neither masked nor holding zeros: nothing to do
        pattern = patterns.get(module, "unstructured")
        if id(module) in protected:
            density = float((module.weight != 0).float().mean())
            report.layers.append(LayerChoice(name, type(module).__name__, pattern, tuple(module.weight.shape),
                                             density, "dense", how="kept dense: its weight is read directly"))
            continue
        calls = shapes.get(module)
        new, record = C.choose(name, module, pattern, calls.input_shape if calls else None, autotune)
        report.layers.append(record)
        if record.how.startswith(C.INCONCLUSIVE):
            report.notes.append(f"{name}: {record.how}")
        if new is not module:
            done = get_record(module)  # the sparse layer inherits what was done to the dense one
            set_record(new, origin=describe_layer(module), pattern=done.pattern, resized=done.resized)
            swaps.append((name, module, new, record))
    return swaps


def _apply(work: nn.Module, swaps: list[Swap], check: Callable[[nn.Module], str | None],
           report: CompressReport) -> nn.Module:
    """Swap the sparse layers in; if the outputs change, keep only those that pass one by one."""
    for name, _, sparse, _ in swaps:
        work = _put(work, name, sparse)
    if not swaps or check(work) is None:
        return work
    for name, dense, _, _ in swaps:
        work = _put(work, name, dense)
    for name, dense, sparse, record in swaps:
        work = _put(work, name, sparse)
        if mismatch := check(work):
            work = _put(work, name, dense)
            record.how = f"kept dense: the {record.kind} kernel did not reproduce the outputs ({mismatch})"
            record.kind = "dense"
            report.notes.append(f"{name}: {record.how}")
            warnings.warn(f"compress: {name}: {record.how}", stacklevel=3)
    return work


def _put(work: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    work.set_submodule(name, module)
    return work


def _shared_modules(model: nn.Module, shapes: dict) -> set[int]:
    """Modules reachable by two names, called twice per forward, or holding a tied parameter."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {key for key, count in counts.items() if count > 1}
    shared |= {id(m) for m, calls in shapes.items() if calls.count > 1}
    holders: dict[int, set[int]] = defaultdict(set)
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)].add(id(module))
    for owners in holders.values():
        if len(owners) > 1:
            shared |= owners
    return shared


def _read_as_tensors(model: nn.Module, regions: list) -> set[int]:
    """Modules whose weights some code reads directly: replacing them would break that code."""
    protected = set()
    for module in model.modules():
        if isinstance(module, _READS_CHILD_WEIGHTS):
            protected |= {id(m) for m in module.modules()}
    for _, root, graph in regions:
        for node in graph.nodes:
            if node.op == "get_attr" and "." in node.target:
                owner = node.target.rsplit(".", 1)[0]
                try:
                    protected.add(id(root.get_submodule(owner)))
                except AttributeError:
                    pass
    return protected


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _tensors(v)]
    return []


def _compare(expected: Any, actual: Any) -> str | None:
    """None when outputs agree within the tolerance of their dtype (:data:`TOLERANCES`), else what differs."""
    want, got = _tensors(expected), _tensors(actual)
    if len(want) != len(got):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if a.is_floating_point():
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            rtol, atol = TOLERANCES.get(a.dtype, (RTOL, ATOL))
            if b.dtype != a.dtype:
                return f"output {i} is {b.dtype} instead of {a.dtype}"
            if not torch.allclose(a, b, rtol=rtol, atol=atol * scale):
                return f"output {i} differs by up to {float((a - b).abs().max()):.3g}"
        elif not torch.equal(a, b):
            return f"output {i} differs"
    return None
