"""Choosing each sparse layer's kernel: dense, CSR or block-sparse.

With ``autotune`` every candidate runs on the layer's own input shape (from the example
input) and the fastest wins; a sparse kernel must beat the dense layer by ``MARGIN`` so
timing noise never makes a layer slower. Timings are cached in-process and, if asked, in a
JSON file, keyed by everything that changes them (shape, pattern, density, rows, threads,
dtype, torch version). Without ``autotune`` a density rule decides (thresholds measured on
a 2-core x86 CPU, see docs/compress.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers.csr import CSRLinear
from ..patterns import Block, PatternError, parse_pattern
from ..gemm import block_density, is_hf_conv1d, to_gemm
from .surgery import CONV_TYPES

MARGIN = 0.10  # a sparse kernel must be this much faster than dense to be chosen
CSR_MAX_DENSITY = 0.05  # density rule: CSR below this element density
BLOCK_MAX_DENSITY = 0.5  # density rule: block kernels below this block density ...
BLOCK_MIN_SIDE = 8  # ... for blocks at least this wide and tall
SPARSE_MAX_DENSITY = 0.75  # denser layers are not even timed sparse
TUNE_SECONDS = 0.2  # timing budget per layer (at least 5 interleaved rounds)
CACHE_ENV = "SPARSENETS_TUNE_CACHE"

_TIMINGS: dict[str, dict[str, float]] = {}  # in-process cache: key -> {kind: ms}


@dataclass
class LayerChoice:
    """What :func:`compress` made of one layer."""

    name: str
    layer: str  # class of the original layer
    pattern: str
    shape: tuple[int, ...]  # weight shape after removing neurons/channels
    density: float  # fraction of nonzero weights
    kind: str  # "dense", "csr" or "block"
    times_ms: dict[str, float] = field(default_factory=dict)  # per candidate, when timed
    how: str = "rule"  # "timed", "cached", "rule" or why the layer stays dense


def _block_of(pattern: str) -> tuple[int, int] | None:
    try:
        parsed = parse_pattern(pattern)
    except PatternError:
        return None
    return (parsed.r, parsed.c) if isinstance(parsed, Block) else None


def _block_classes() -> dict[type, type] | None:
    """Block-sparse layers by the layer they replace, or None where they are not installed."""
    try:
        from ..layers import block_sparse as bs
    except ImportError:
        return None
    return {nn.Linear: bs.BlockSparseLinear, nn.Conv1d: bs.BlockSparseConv1d, nn.Conv2d: bs.BlockSparseConv2d}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def candidates(module: nn.Module, pattern: str) -> dict[str, Callable[[], nn.Module]]:
    """Builders of every kernel that can replace ``module`` exactly, keyed by kind."""
    weight = module.weight.detach()
    gemm = to_gemm(module, weight)
    bias = getattr(module, "bias", None)
    builders: dict[str, Callable[[], nn.Module]] = {"dense": lambda: module}
    if _is_linear(module):
        builders["csr"] = lambda: CSRLinear.from_dense(gemm, gemm != 0, bias)
    block = _block_of(pattern)
    classes = _block_classes()
    if block is not None and classes is not None and block[0] <= gemm.shape[0] and block[1] <= gemm.shape[1]:
        if _is_linear(module):
            builders["block"] = lambda: classes[nn.Linear].from_dense(gemm, gemm != 0, bias, block)
        elif type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1:
            cls = classes[type(module)]
            builders["block"] = lambda: cls.from_dense(module, weight, weight != 0, block)
    return builders



def rule(module: nn.Module, pattern: str, kinds: list[str]) -> str:
    """The density rule used without timing."""
    gemm = to_gemm(module, module.weight.detach())
    block = _block_of(pattern)
    if "block" in kinds and min(block) >= BLOCK_MIN_SIDE and block_density(gemm, block) <= BLOCK_MAX_DENSITY:
        return "block"
    if "csr" in kinds and float((gemm != 0).float().mean()) <= CSR_MAX_DENSITY:
        return "csr"
    return "dense"


def _input_for(module: nn.Module, input_shape: tuple[int, ...] | None) -> Tensor | None:
    """A random input shaped like the layer's example input (after channel removal), or None."""
    weight = module.weight
    if isinstance(module, CONV_TYPES):
        if input_shape is None:
            return None
        shape = (*input_shape[:-module.weight.dim() + 1], module.in_channels, *input_shape[-weight.dim() + 2:])
    else:
        width = weight.shape[0] if is_hf_conv1d(module) else weight.shape[1]
        shape = (*input_shape[:-1], width) if input_shape is not None else (1, width)
    return torch.randn(shape, dtype=weight.dtype, device=weight.device)


def _time(builds: dict[str, nn.Module], x: Tensor) -> dict[str, float]:
    """Best-of-n milliseconds per candidate, rounds interleaved so drifting load hits all alike."""
    best = dict.fromkeys(builds, math.inf)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # GPU calls return before they finish
    with torch.no_grad():
        for module in builds.values():
            module(x)  # warm-up: first calls build kernels and caches
        start, rounds = time.perf_counter(), 0
        while rounds < 5 or (rounds < 200 and time.perf_counter() - start < TUNE_SECONDS):
            for kind, module in builds.items():
                sync()
                t0 = time.perf_counter()
                module(x)
                sync()
                best[kind] = min(best[kind], time.perf_counter() - t0)
            rounds += 1
    return {kind: 1e3 * t for kind, t in best.items()}


def _key(module: nn.Module, pattern: str, x: Tensor, density: float) -> str:
    geometry = ""
    if isinstance(module, CONV_TYPES):
        geometry = f"|k{module.kernel_size}s{module.stride}p{module.padding}d{module.dilation}"
    return (f"{type(module).__name__}|w{tuple(module.weight.shape)}{geometry}|x{tuple(x.shape)}|{pattern}"
            f"|d{density:.2f}|t{torch.get_num_threads()}|{str(x.dtype).removeprefix('torch.')}"
            f"|{x.device.type}|torch{torch.__version__}")


def _runs(layer: nn.Module, x: Tensor | None) -> bool:
    """Whether a candidate runs on this input at all (some dtypes and devices lack sparse ops)."""
    if x is None:
        return True
    try:
        with torch.no_grad():
            layer(x)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return False
    return True


def choose(name: str, module: nn.Module, pattern: str, input_shape: tuple[int, ...] | None,
           autotune: bool) -> tuple[nn.Module, LayerChoice]:
    """The fastest exact replacement of ``module`` (possibly itself) and the record of the choice."""
    gemm = to_gemm(module, module.weight.detach())
    density = float((gemm != 0).float().mean())
    builders = candidates(module, pattern)
    record = LayerChoice(name, type(module).__name__, pattern, tuple(module.weight.shape), density, "dense")
    if density > SPARSE_MAX_DENSITY or len(builders) == 1:  # no sparse kernel would win: don't time
        record.how = f"density {density:.2f}" if density > SPARSE_MAX_DENSITY else "no sparse kernel fits"
        return module, record
    x = _input_for(module, input_shape)
    if not autotune or x is None:
        record.kind = rule(module, pattern, list(builders))
        if autotune:
            record.how = "rule (no example input to time a convolution)"
        layer = builders[record.kind]()
        if not _runs(layer, x):
            layer, record.kind, record.how = module, "dense", f"{record.kind} kernel does not run on this input"
        return layer, record
    key = _key(module, pattern, x, density)
    times = _TIMINGS.get(key)
    built: dict[str, nn.Module] = {}
    if times and set(builders) <= set(times):
        record.how = "cached"
    else:
        record.how = "timed"
        built = {kind: layer for kind, build in builders.items() if _runs(layer := build(), x)}
        times = _TIMINGS[key] = _time(built, x)
    record.times_ms = {kind: times[kind] for kind in builders if kind in times}
    sparse = {k: t for k, t in record.times_ms.items() if k != "dense"}
    fastest = min(sparse, key=sparse.get) if sparse else "dense"
    if sparse and sparse[fastest] < (1 - MARGIN) * record.times_ms["dense"]:
        record.kind = fastest
    return built[record.kind] if record.kind in built else builders[record.kind](), record


# ---- the on-disk cache ---------------------------------------------------------------------------


def cache_path(cache: str | os.PathLike | None) -> Path | None:
    if cache is None:
        cache = os.environ.get(CACHE_ENV)
    return Path(cache) if cache else None


def load_cache(path: Path | None) -> None:
    if path is None or not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"autotune cache {path} is not readable JSON ({err}); delete it or pass another") from None
    for key, times in stored.items():
        _TIMINGS.setdefault(key, {k: float(v) for k, v in times.items()})


def save_cache(path: Path | None) -> None:
    """Merge this process's timings into ``path`` (atomically: a crash leaves the old file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.update(_TIMINGS)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(stored, handle, indent=0, sort_keys=True)
    os.replace(handle.name, path)
