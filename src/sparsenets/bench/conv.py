"""How much faster block-sparse convolutions run than ``nn.Conv1d``/``nn.Conv2d``.

Each case is a convolution whose GEMM-form weight (``out × in·k``) keeps blocks at random to an
exact sparsity. Side by side, with the same weight, it times the dense layer, this library's
:class:`~sparsenets.layers.BlockSparseConv2d` (or ``1d``) and, for reference, the same layer
on unfolded patches (the path it takes at strides above 1). Implementations run in interleaved
rounds (:mod:`sparsenets.utils.timing`); each figure is the median over the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compression.pipeline import CompressReport
from ..layers.block_sparse import BlockSparseConv1d, BlockSparseConv2d
from ..utils import timing
from . import at_threads, block_mask, layer_step, speedups

IMPLEMENTATIONS = ("dense", "sparsenets", "unfold")
MODES = ("forward", "forward+backward")
MIN_ROUNDS = 3


@dataclass(frozen=True)
class ConvCase:
    channels: tuple[int, int]  # in, out
    kernel: int
    spatial: tuple[int, ...]  # (H, W) or (L,)
    batch: int
    sparsity: float
    mode: str = "forward"
    block: tuple[int, int] = (32, 32)

    @property
    def label(self) -> str:
        size = "x".join(map(str, self.spatial))
        taps = "x".join([str(self.kernel)] * len(self.spatial))
        return f"conv{len(self.spatial)}d {self.channels[0]}->{self.channels[1]} {taps} {size} batch {self.batch}"


def default_cases(modes: tuple[str, ...] = MODES) -> list[ConvCase]:
    """The 256-channel 28×28 layer at 90/75/50%, a 64-channel 56×56 one and a Conv1d, in each mode."""
    cases = [ConvCase((256, 256), 3, (28, 28), 32, s) for s in (0.9, 0.75, 0.5)]
    cases += [ConvCase((64, 64), 3, (56, 56), 32, 0.9), ConvCase((512, 512), 3, (1024,), 16, 0.9)]
    return [replace(case, mode=mode) for mode in modes for case in cases]


def _layers(case: ConvCase, generator: torch.Generator) -> tuple[nn.Module, BlockSparseConv1d | BlockSparseConv2d]:
    two_d = len(case.spatial) == 2
    dense = (nn.Conv2d if two_d else nn.Conv1d)(*case.channels, case.kernel, padding=case.kernel // 2)
    taps = case.kernel ** len(case.spatial)
    mask = block_mask((case.channels[1], case.channels[0] * taps), case.block, case.sparsity, generator)
    mask = mask.reshape(dense.weight.shape)
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = (BlockSparseConv2d if two_d else BlockSparseConv1d).from_dense(dense, dense.weight, mask, case.block)
    return dense, sparse


def _unfolded(layer: BlockSparseConv1d | BlockSparseConv2d) -> Callable[[Tensor], Tensor]:
    """The layer's convolution on unfolded patches (zero padding)."""
    def forward(x: Tensor) -> Tensor:
        planar = F.pad(x, layer._pad)
        planar = planar.unsqueeze(2) if layer.dims == 1 else planar
        y = layer._unfolded(planar, *(layer._planar(v) for v in (layer.kernel_size, layer.stride, layer.dilation)))
        return (y.squeeze(2) if layer.dims == 1 else y).contiguous()
    return forward


def measure(case: ConvCase, repeats: int = 5, warmup: int = 1, budget_s: float = 3.0, seed: int = 0,
            impls: tuple[str, ...] = IMPLEMENTATIONS) -> dict:
    """Median milliseconds of each implementation on one case, plus speedups over dense; JSON-ready."""
    generator = torch.Generator().manual_seed(seed)
    dense, sparse = _layers(case, generator)
    x = torch.randn(case.batch, case.channels[0], *case.spatial, generator=generator)
    backward = case.mode == "forward+backward"
    forwards: dict[str, tuple[Callable[[Tensor], Tensor], nn.Module]] = {
        "dense": (dense, dense), "sparsenets": (sparse, sparse), "unfold": (_unfolded(sparse), sparse)}
    steps = {name: layer_step(forward, x, list(owner.parameters()), backward)
             for name, (forward, owner) in forwards.items() if name == "dense" or name in impls}
    with torch.enable_grad() if backward else torch.inference_mode():
        timings = timing.interleaved(steps, rounds=repeats, warmup=warmup, min_rounds=MIN_ROUNDS,
                                     candidate_budget_s=budget_s)
    return {
        "layer": case.label, "channels": list(case.channels), "kernel": case.kernel, "spatial": list(case.spatial),
        "batch": case.batch, "pattern": f"block:{case.block[0]}x{case.block[1]}", "sparsity": case.sparsity,
        "density": sparse.density, "mode": case.mode, "threads": torch.get_num_threads(),
        **speedups(timings),
    }


def rows(threads: int | None = None, repeats: int = 5, cases: list[ConvCase] | None = None,
         warmup: int = 1, budget_s: float = 3.0, impls: tuple[str, ...] = IMPLEMENTATIONS) -> list[dict]:
    """One row per case (default: :func:`default_cases`), on ``threads`` threads (default: as set),
    timing dense and ``impls``."""
    return at_threads(threads, lambda: [measure(case, repeats, warmup, budget_s, impls=impls)
                                        for case in cases or default_cases()])


def ideal(row: dict) -> float:
    """The speedup that skipping the removed blocks alone would give."""
    return 1 / row["density"] if row["density"] else math.inf


def small_cnn() -> nn.Sequential:
    """A VGG-like network on 32×32 images: three wide convolutions after a narrow first one."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*block(3, 64), *block(64, 128), nn.MaxPool2d(2), *block(128, 256), *block(256, 256),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256 * 8 * 8, 10))


def compress_picks(sparsity: float = 0.9, batch: int = 16, pattern: str = "block:32x32") -> list[dict]:
    """What :func:`sparsenets.compress` picks for each layer of :func:`small_cnn` at ``sparsity``."""
    import sparsenets as sn

    model = small_cnn()
    sn.sparsify_(model, {"sparsity": sparsity, "pattern": pattern, "exclude": ["0", "11"]})  # under a block
    compressed = sn.compress(model.eval(), torch.randn(batch, 3, 32, 32), shrink=False)
    report = cast(CompressReport, compressed.compress_report)
    return [{"layer": c.name, "shape": list(c.shape), "density": c.density, "kind": c.kind, "how": c.how,
             "ms": c.times_ms} for c in report.layers]
