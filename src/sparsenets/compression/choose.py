"""Choosing each sparse layer's kernel: dense, CSR, block-sparse or N:M.

A density rule (thresholds measured on a 2-core x86 CPU, see docs/compress.md) gives each
layer a first choice. With ``autotune`` every candidate then runs on the layer's own input
shape (from the example input) in interleaved rounds (:mod:`sparsenets.utils.timing`; more
rounds while the answer is open), and timing overrides the rule only on significant evidence:
another kernel is chosen when the per-round ratio of its time to the rule's choice has a
median whose upper confidence bound (:data:`CONFIDENCE`) lies below ``1 - MARGIN``. On a busy
machine single calls stall for whole scheduler slices and best-of-n or mean times mislead;
paired ratios and their median do not, and when they cannot decide, the rule stands and the
record says so. Timings are cached in-process and, if asked, in a JSON file, keyed by
everything that changes them (shape, pattern, density, rows, threads, dtype, torch version).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PatternError
from ..gemm import block_density, is_hf_conv1d, to_gemm
from ..layers.csr import CSRLinear
from ..layers.nm import NMSparseLinear
from ..patterns import NM, block_shape_of, parse_pattern
from ..utils import atomic, cache, timing
from .surgery import CONV_TYPES, weight_of

MARGIN = 0.10  # another kernel must be this much faster than the rule's choice to replace it
CONFIDENCE = 0.90  # of the interval for the median time ratio (each bound holds at 95 %)
CSR_MAX_DENSITY = 0.05  # density rule: CSR below this element density
BLOCK_MAX_DENSITY = 0.5  # density rule: block kernels below this block density ...
BLOCK_MIN_SIDE = 8  # ... for blocks at least this wide and tall
SPARSE_MAX_DENSITY = 0.75  # denser layers are not even timed sparse
TUNE_SECONDS = 0.2  # timing budget per layer ...
MIN_ROUNDS = 5  # ... but at least this many rounds: fewer can never be significant at CONFIDENCE
EXTENSIONS = 3  # further budgets of timing while the result is inconclusive
MAX_ROUNDS = 200
INCONCLUSIVE = "rule (timing inconclusive"
CACHE_ENV = "SPARSENETS_TUNE_CACHE"

_TIMINGS: dict[str, dict[str, list[float]]] = {}  # in-process cache: key -> {kind: seconds per round}


@dataclass
class LayerChoice:
    """What :func:`compress` made of one layer."""

    name: str
    layer: str  # class of the original layer
    pattern: str
    shape: tuple[int, ...]  # weight shape after removing neurons/channels
    density: float  # fraction of nonzero weights
    kind: str  # "dense", "csr", "block" or "nm"
    times_ms: dict[str, float] = field(default_factory=dict)  # median per candidate, when timed
    how: str = "rule"  # "timed", "cached", "rule", "rule (timing inconclusive: ...)" or why it stays dense



def _block_classes() -> dict[type[nn.Module], Any] | None:
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
    weight = weight_of(module).detach()
    gemm = to_gemm(module, weight)
    bias = getattr(module, "bias", None)
    builders: dict[str, Callable[[], nn.Module]] = {"dense": lambda: module}
    if _is_linear(module):
        builders["csr"] = lambda: CSRLinear.from_dense(gemm, gemm != 0, bias)
        if (nm := _n_m(pattern)) is not None and nm[1] <= 256 and NM(*nm).conforms(gemm != 0):
            builders["nm"] = lambda: NMSparseLinear.from_dense(gemm, None, bias, *nm)
    block = block_shape_of(pattern)
    classes = _block_classes()
    if block is not None and classes is not None and block[0] <= gemm.shape[0] and block[1] <= gemm.shape[1]:
        if _is_linear(module):
            builders["block"] = lambda: classes[nn.Linear].from_dense(gemm, gemm != 0, bias, block)
        elif type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1:
            cls = classes[type(module)]
            builders["block"] = lambda: cls.from_dense(module, weight, weight != 0, block)
    return builders



def _n_m(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` of an N:M pattern name such as ``"2:4"``, else None."""
    try:
        return parse_pattern(pattern).n_m if pattern else None
    except PatternError:
        return None


def rule(module: nn.Module, pattern: str, kinds: list[str]) -> str:
    """The density rule used without timing."""
    gemm = to_gemm(module, weight_of(module).detach())
    block = block_shape_of(pattern)
    if ("block" in kinds and block is not None  # "block" is a candidate only for block patterns
            and min(block) >= BLOCK_MIN_SIDE and block_density(gemm, block) <= BLOCK_MAX_DENSITY):
        return "block"
    if "csr" in kinds and float((gemm != 0).float().mean()) <= CSR_MAX_DENSITY:
        return "csr"
    return "dense"


def _input_for(module: nn.Module, input_shape: tuple[int, ...] | None) -> Tensor | None:
    """A random input shaped like the layer's example input (after channel removal), or None."""
    weight = weight_of(module)
    if isinstance(module, CONV_TYPES):
        if input_shape is None:
            return None
        shape = (*input_shape[:-weight.dim() + 1], module.in_channels, *input_shape[-weight.dim() + 2:])
    else:
        width = weight.shape[0] if is_hf_conv1d(module) else weight.shape[1]
        shape = (*input_shape[:-1], width) if input_shape is not None else (1, width)
    generator = torch.Generator(device=weight.device).manual_seed(0)  # leaves the global RNG alone
    return torch.randn(shape, generator=generator, dtype=weight.dtype, device=weight.device)


def _measure(built: dict[str, nn.Module], x: Tensor, prior: str) -> timing.Timings:
    """Interleaved rounds of every candidate: one budget, and more while the choice stays open."""
    calls = {kind: functools.partial(layer, x) for kind, layer in built.items()}
    found = timing.Timings({kind: [] for kind in calls})
    with torch.no_grad():
        for step in range(1 + EXTENSIONS):
            rounds = MAX_ROUNDS - len(found.seconds[prior])
            found.extend(timing.interleaved(calls, rounds=rounds, min_rounds=MIN_ROUNDS, warmup=int(step == 0),
                                            budget_s=TUNE_SECONDS, sync=timing.cuda_sync(x)))
            if rounds <= 0 or not decide(found, prior)[1].startswith(INCONCLUSIVE):
                break
    return found


def decide(timings: timing.Timings, prior: str) -> tuple[str, str]:
    """The kernel to use and how it was chosen, from paired rounds and the rule's choice ``prior``.

    Another kernel replaces ``prior`` only if the upper bound of its median per-round time ratio
    to ``prior`` is below ``1 - MARGIN`` (the fastest such one, by median ratio). If every other
    kernel is shown not to be that much faster, timing confirms the rule; otherwise it was
    inconclusive and the rule stands.
    """
    winners, unsure = {}, []
    for kind in timings.seconds:
        if kind == prior:
            continue
        ratios = timings.ratios(kind, prior)
        low, high = timing.median_interval(ratios, CONFIDENCE)
        middle = statistics.median(ratios) if ratios else float("nan")
        if high < 1 - MARGIN:
            winners[kind] = middle
        elif low < 1 - MARGIN:
            unsure.append(f"{kind}/{prior} {middle:.2f} [{low:.2f}, {high:.2f}] over {len(ratios)} rounds")
    if winners:
        return min(winners, key=lambda kind: winners[kind]), "timed"
    if unsure:
        return prior, f"{INCONCLUSIVE}: {'; '.join(unsure)})"
    return prior, "timed"


def _key(module: nn.Module, pattern: str, x: Tensor, density: float) -> str:
    geometry = ""
    if isinstance(module, CONV_TYPES):
        geometry = f"|k{module.kernel_size}s{module.stride}p{module.padding}d{module.dilation}"
    return (f"{type(module).__name__}|w{tuple(weight_of(module).shape)}{geometry}|x{tuple(x.shape)}|{pattern}"
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
    # Sparse layers start from a random init (then overwritten): keep it off the caller's RNG.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        return _choose(name, module, pattern, input_shape, autotune)


def _choose(name: str, module: nn.Module, pattern: str, input_shape: tuple[int, ...] | None,
            autotune: bool) -> tuple[nn.Module, LayerChoice]:
    weight = weight_of(module)
    gemm = to_gemm(module, weight.detach())
    density = float((gemm != 0).float().mean())
    builders = candidates(module, pattern)
    record = LayerChoice(name, type(module).__name__, pattern, tuple(weight.shape), density, "dense")
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
    rounds = _TIMINGS.get(key, {})
    built: dict[str, nn.Module] = {}
    cached = bool(rounds) and set(builders) <= set(rounds)
    prior = rule(module, pattern, list(builders))
    if not cached:
        built = {kind: layer for kind, build in builders.items() if _runs(layer := build(), x)}
        rounds = _TIMINGS[key] = _measure(built, x, prior if prior in built else "dense").seconds
    timings = timing.Timings({kind: rounds[kind] for kind in builders if kind in rounds})
    record.times_ms = timings.median_ms()
    record.kind, record.how = decide(timings, prior if prior in timings.seconds else "dense")
    if cached and record.how == "timed":
        record.how = "cached"
    return built[record.kind] if record.kind in built else builders[record.kind](), record


# ---- the on-disk cache ---------------------------------------------------------------------------


def cache_path(path: str | os.PathLike | bool | None) -> Path | None:
    """The timings file: ``path``; ``True`` for ``autotune/timings.json`` in the sparsenets cache;
    None for ``$SPARSENETS_TUNE_CACHE`` (in-process only when unset)."""
    if path is True:
        return cache.cache_dir("autotune") / "timings.json"
    if path is None or path is False:
        path = os.environ.get(CACHE_ENV) if path is None else None
    return Path(path) if path else None


def _valid(entry) -> bool:
    """A stored entry in the current format: seconds per round, per kernel (older files held one time)."""
    return isinstance(entry, dict) and all(
        isinstance(times, list) and all(isinstance(t, (int, float)) for t in times) for times in entry.values())


def _read(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"autotune cache {path} is not readable JSON ({err}); delete it or pass another") from None
    if not isinstance(stored, dict):
        raise ValueError(f"autotune cache {path} does not hold a JSON object; delete it or pass another")
    return {key: entry for key, entry in stored.items() if _valid(entry)}


def load_cache(path: Path | None) -> None:
    if path is None or not path.exists():
        return
    for key, rounds in _read(path).items():
        _TIMINGS.setdefault(key, {kind: [float(t) for t in times] for kind, times in rounds.items()})


def save_cache(path: Path | None) -> None:
    """Merge this process's timings into ``path``, written atomically with the user's usual permissions."""
    if path is None:
        return
    stored = _read(path) if path.exists() else {}
    stored.update({key: {kind: [float(f"{t:.6g}") for t in times] for kind, times in rounds.items()}
                   for key, rounds in _TIMINGS.items()})
    atomic.write_json(path, stored)
