"""``sparsenets bench``: how much faster sparse layers run than dense ones.

This module times one block-sparse Linear layer against dense and other sparse formats; its
neighbours time convolutions (:mod:`.conv`), unstructured and N:M layers (:mod:`.sparse`) and
whole compressed transformer blocks (:mod:`.end_to_end`), and :mod:`.suite` puts every kernel
beside its goal in one table (``sparsenets bench --suite``).

Each case is a Linear weight (``out × in``) whose blocks are kept at random to an exact
sparsity. Side by side, in one process and with the same weight, it times: dense
``F.linear``; torch's own BSR and CSR tensors (``torch.sparse.mm``); this library's
:class:`~sparsenets.layers.BlockSparseLinear`; and SparseLab's ``SparseLinear`` when the
optional ``sparselab`` package is installed (its own random unstructured mask at the same
sparsity: it has no block format). Implementations run in interleaved rounds
(:mod:`sparsenets.utils.timing`) so that load from other processes hits them alike; each
figure is the median over the rounds. The command line is in :mod:`sparsenets.cli.bench`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import timing

IMPLEMENTATIONS = ("dense", "torch-bsr", "torch-csr", "sparsenets", "sparselab")
MODES = ("forward", "forward+backward")
MIN_ROUNDS = 3  # timed rounds every implementation gets, whatever its time budget
Step = Callable[[], object]


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int]  # out × in
    sparsity: float
    batch: int
    mode: str


# ---- the implementations ------------------------------------------------------------------------
# Each returns a step (one forward, or forward + backward) or a string saying why it can't run.


def _step(forward: Callable[[], Tensor], leaves: list[Tensor], backward: bool) -> Step:
    """The forward alone, or a training step: fresh gradients (as after zero_grad), forward, backward."""
    if not backward:
        return forward

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().sum().backward()
    return step


def layer_step(forward: Callable[[Tensor], Tensor], x: Tensor, leaves: list[Tensor], backward: bool) -> Step:
    """:func:`_step` for a layer called on ``x``; in training ``x`` gets its gradient too."""
    if backward:
        x = x.clone().requires_grad_()
        leaves = [x, *leaves]
    return _step(functools.partial(forward, x), leaves, backward)


def speedups(timings: timing.Timings) -> dict:
    """Median ms, rounds and speedups over ``"dense"`` of a timing, as the benchmark rows carry them."""
    ms = timings.median_ms()
    return {"ms": ms, "rounds": {name: len(t) for name, t in timings.seconds.items()},
            "speedup": {name: ms["dense"] / t for name, t in ms.items()},
            # the median of per-round ratios: robust to rounds that stalled on other processes' load
            "paired_speedup": {name: statistics.median(timings.ratios("dense", name)) for name in ms}}


def at_threads(threads: int | None, run: Callable[[], list[dict]]) -> list[dict]:
    """``run()`` with torch set to ``threads`` threads (None: as set), the setting restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(previous)


def _dense(weight: Tensor, mask: Tensor, block, sparsity, x: Tensor, backward: bool) -> Step | str:
    w, x = weight.clone().requires_grad_(backward), x.clone().requires_grad_(backward)
    return _step(lambda: F.linear(x, w), [w, x], backward)


def _torch_sparse(layout: str) -> Callable[..., Step | str]:
    def build(weight: Tensor, mask: Tensor, block, sparsity, x: Tensor, backward: bool) -> Step | str:
        if layout == "bsr":
            if backward:
                return "torch has no BSR backward on CPU"
            if weight.shape[0] % block[0] or weight.shape[1] % block[1]:
                return "torch's BSR needs shapes that divide by the block"
            sparse = weight.to_sparse_bsr(block)
        else:
            sparse = weight.to_sparse_csr()
        w, x = sparse.clone().requires_grad_(backward), x.clone().requires_grad_(backward)
        return _step(lambda: torch.sparse.mm(w, x.t()).t(), [w, x], backward)
    return build


def _sparsenets(weight: Tensor, mask: Tensor, block, sparsity, x: Tensor, backward: bool) -> Step | str:
    from ..layers import BlockSparseLinear

    layer = BlockSparseLinear.from_dense(weight, mask, None, block)
    x = x.clone().requires_grad_(backward)
    return _step(lambda: layer(x), [layer.values, x], backward)


def _sparselab(weight: Tensor, mask: Tensor, block, sparsity, x: Tensor, backward: bool) -> Step | str:
    if importlib.util.find_spec("sparselab") is None:
        return "not installed (pip install sparselab)"
    # SparseLab bundles a second OpenMP runtime; its idle threads would spin on the cores the
    # other implementations are timed on. Passive waiting (read when it loads) prevents that.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import sparselab

    # SparseLab caches transposed weights by id(); a new layer can reuse a freed layer's id and
    # get its stale transpose (0.2.2: wrong gradients or IndexError). Start each case afresh.
    clear_cache = getattr(getattr(sparselab, "ops", None), "_clear_transpose_cache", None)
    if clear_cache is not None:
        clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = sparselab.SparseLinear(weight.shape[1], weight.shape[0], bias=False, sparsity=sparsity)
    x = x.clone().requires_grad_(backward)
    return _step(lambda: layer(x), [*layer.parameters(), x], backward)


BUILDERS = {"dense": _dense, "torch-bsr": _torch_sparse("bsr"), "torch-csr": _torch_sparse("csr"),
            "sparsenets": _sparsenets, "sparselab": _sparselab}


# ---- measuring ------------------------------------------------------------------------------------


def block_mask(shape: tuple[int, int], block: tuple[int, int], sparsity: float, generator) -> Tensor:
    """A mask keeping ``round((1 - sparsity) · n_blocks)`` blocks chosen at random."""
    rows, cols = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    n_keep = round((1 - sparsity) * rows * cols)
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=generator)[:n_keep]] = True
    keep = keep.view(rows, cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return keep[: shape[0], : shape[1]].contiguous()


def measure(case: Case, block: tuple[int, int], impls: list[str], repeats: int, warmup: int,
            budget_s: float = 2.0, seed: int = 0) -> dict:
    """Median milliseconds of each implementation on one case, plus speedups; a JSON-ready row."""
    generator = torch.Generator().manual_seed(seed)
    mask = block_mask(case.shape, block, case.sparsity, generator)
    weight = torch.randn(case.shape, generator=generator) * mask
    x = torch.randn(case.batch, case.shape[1], generator=generator)
    backward = case.mode == "forward+backward"
    steps, notes = {}, {}
    for name in impls:
        built = BUILDERS[name](weight, mask, block, case.sparsity, x, backward)
        if isinstance(built, str):
            notes[name] = built
        else:
            steps[name] = built
    context = torch.enable_grad if backward else torch.inference_mode
    with context():  # a very slow implementation stops after MIN_ROUNDS once it has used its budget
        timings = timing.interleaved(steps, rounds=repeats, warmup=warmup, min_rounds=MIN_ROUNDS,
                                     candidate_budget_s=budget_s)
    ms = timings.median_ms()
    density = mask.float().mean().item()
    speedup = {name: ms["dense"] / t for name, t in ms.items()} if "dense" in ms else {}
    return {
        "shape": list(case.shape), "pattern": f"block:{block[0]}x{block[1]}", "sparsity": case.sparsity,
        "density": density, "batch": case.batch, "mode": case.mode, "threads": torch.get_num_threads(),
        "ms": ms, "rounds": {name: len(t) for name, t in timings.seconds.items()}, "speedup": speedup,
        "fraction_of_ideal": {name: s * density for name, s in speedup.items()},
        "notes": notes,
    }


def run(cases: list[Case], block: tuple[int, int], impls: list[str], repeats: int, warmup: int,
        budget_s: float = 2.0, progress: bool = True) -> list[dict]:
    from rich.progress import Progress

    rows = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("benchmarking", total=len(cases))
        for case in cases:
            bar.update(task, description=f"{case.shape[0]}x{case.shape[1]} s={case.sparsity} "
                                         f"batch={case.batch} {case.mode}")
            rows.append(measure(case, block, impls, repeats, warmup, budget_s))
            bar.advance(task)
    return rows


# ---- reporting ------------------------------------------------------------------------------------


def machine() -> dict:
    from ..kernels import cpu
    from ..kernels.int8 import describe as int8_kernels

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "kernels": f"{cpu.describe()}; {int8_kernels()}",
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict], impls: list[str]):
    from rich.table import Table

    out = Table(title="Linear layer: median ms (speedup over dense)", title_justify="left")
    for col in ("shape", "sparsity", "batch", "mode"):
        out.add_column(col, justify="right" if col in ("sparsity", "batch") else "left")
    for name in impls:
        out.add_column(name, justify="right")
    out.add_column("ideal", justify="right")
    out.add_column("sparsenets / ideal", justify="right")
    for row in rows:
        mode = {"forward": "fwd", "forward+backward": "fwd+bwd"}[row["mode"]]
        cells = [f"{row['shape'][0]}x{row['shape'][1]}", f"{row['sparsity']:.0%}", str(row["batch"]), mode]
        for name in impls:
            if name in row["ms"]:
                speed = row["speedup"].get(name)
                cells.append(f"{row['ms'][name]:.3g}" + (f" ({speed:.2f}x)" if speed and name != "dense" else ""))
            else:
                cells.append("n/a")
        cells.append(f"{1 / row['density']:.1f}x" if row["density"] else "-")
        fraction = row["fraction_of_ideal"].get("sparsenets")
        cells.append(f"{fraction:.0%}" if fraction is not None else "-")
        out.add_row(*cells)
    return out
