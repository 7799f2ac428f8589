"""How much faster unstructured (CSR) and N:M sparse Linear layers run than dense ones.

Each case is one ``out × in`` Linear layer with a weight pruned at random to an unstructured
sparsity or to an N:M pattern. Side by side, with the same weight, it times the dense layer,
this library's :class:`~sparsenets.layers.CSRLinear` (unstructured) or
:class:`~sparsenets.layers.NMSparseLinear` (N:M), torch's sparse CSR product
(``torch.sparse.mm``, MKL on CPU, with the same backward as a library would write it) and any
peer the caller builds from the same weight (``bench/unstructured_nm.py`` adds SparseLab).
Implementations run in interleaved rounds (:mod:`sparsenets.utils.timing`); each figure is the
median over the rounds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers.csr import CSRLinear
from ..layers.nm import NMSparseLinear
from ..patterns import parse_pattern
from ..utils import timing
from . import at_threads, layer_step, speedups

MODES = ("forward", "forward+backward")
MIN_ROUNDS = 3
Forward = Callable[[Tensor], Tensor]
# Builds another library's layer from (weight, bias): its forward and its trainable tensors.
Peer = Callable[[Tensor, Tensor], tuple[Forward, list[Tensor]]]


@dataclass(frozen=True)
class SparseCase:
    pattern: str  # "unstructured" or "N:M"
    sparsity: float  # unstructured only; N:M fixes its own
    batch: int
    mode: str = "forward"
    shape: tuple[int, int] = (2048, 2048)  # out, in

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern).n_m

    @property
    def density(self) -> float:
        n_m = self.n_m
        return n_m[0] / n_m[1] if n_m else 1 - self.sparsity


def default_cases(modes: tuple[str, ...] = MODES) -> list[SparseCase]:
    """2048², unstructured at 90/95/98% (batch 512 and 1) and 2:4, 1:4, 2:8 (batch 512 and 64)."""
    cases = [SparseCase("unstructured", s, b) for b in (512, 1) for s in (0.9, 0.95, 0.98)]
    cases += [SparseCase(p, 1 - int(p[0]) / int(p[2]), b) for b in (512, 64) for p in ("2:4", "1:4", "2:8")]
    return [SparseCase(c.pattern, c.sparsity, c.batch, mode, c.shape) for mode in modes for c in cases]


def _mask(case: SparseCase, generator: torch.Generator) -> Tensor:
    scores = torch.rand(case.shape, generator=generator)
    if case.n_m:
        return parse_pattern(case.pattern).select(scores)
    keep = round(case.density * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(keep).indices] = True
    return mask.reshape(case.shape)


class _TorchCSR(torch.autograd.Function):
    """``x · Wᵀ + b`` on torch's sparse CSR ops: ``sparse.mm`` forward, ``dY · W`` and a sampled
    ``dYᵀ · X`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.weight = weight
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, = ctx.saved_tensors
        grad_x = torch.mm(grad_out, ctx.weight)
        grad_values = torch.sparse.sampled_addmm(ctx.weight, grad_out.t(), x, beta=0.0).values()
        return grad_x, grad_values, grad_out.sum(0), None


def _torch_csr(weight: Tensor, bias: Tensor) -> tuple[Forward, list[Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        sparse = weight.to_sparse_csr()
    values = sparse.values().clone().requires_grad_()
    sparse = torch.sparse_csr_tensor(sparse.crow_indices(), sparse.col_indices(), values.detach(), sparse.shape,
                                     check_invariants=False)
    bias = bias.clone().requires_grad_()
    return lambda x: _TorchCSR.apply(x, values, bias, sparse), [values, bias]


def _leaves(module: nn.Module) -> list[Tensor]:
    return list(module.parameters())


def implementations(case: SparseCase, generator: torch.Generator,
                    peers: dict[str, Peer] | None = None) -> dict[str, tuple[Forward, list[Tensor]]]:
    """Each implementation's forward and trainable tensors, all on the same masked weight."""
    mask = _mask(case, generator)
    weight = torch.randn(case.shape, generator=generator) * mask
    bias = torch.randn(case.shape[0], generator=generator)
    dense = nn.Linear(case.shape[1], case.shape[0])
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    n_m = case.n_m
    sparse = NMSparseLinear.from_dense(weight, mask, bias, *n_m) if n_m else CSRLinear.from_dense(weight, mask, bias)
    found: dict[str, tuple[Forward, list[Tensor]]] = {"dense": (dense, _leaves(dense)),
                                                       "sparsenets": (sparse, _leaves(sparse)),
                                                       "torch_csr": _torch_csr(weight, bias)}
    for name, build in (peers or {}).items():
        found[name] = build(weight, bias)
    return found


def measure(case: SparseCase, repeats: int = 7, warmup: int = 1, budget_s: float = 3.0, seed: int = 0,
            peers: dict[str, Peer] | None = None) -> dict:
    """Median milliseconds of each implementation on one case, plus speedups over dense; JSON-ready."""
    generator = torch.Generator().manual_seed(seed)
    backward = case.mode == "forward+backward"
    x = torch.randn(case.batch, case.shape[1], generator=generator)
    steps = {name: layer_step(forward, x, leaves, backward)
             for name, (forward, leaves) in implementations(case, generator, peers).items()}
    with torch.enable_grad() if backward else torch.inference_mode():
        timings = timing.interleaved(steps, rounds=repeats, warmup=warmup, min_rounds=MIN_ROUNDS,
                                     candidate_budget_s=budget_s)
    return {
        "pattern": case.pattern, "sparsity": 1 - case.density, "batch": case.batch, "mode": case.mode,
        "shape": list(case.shape), "threads": torch.get_num_threads(),
        **speedups(timings),
    }


def rows(threads: int | None = None, repeats: int = 7, cases: list[SparseCase] | None = None,
         warmup: int = 1, budget_s: float = 3.0, peers: dict[str, Peer] | None = None) -> list[dict]:
    """One row per case (default: :func:`default_cases`), on ``threads`` threads (default: as set),
    timing ``peers`` (name: builder) beside the built-in implementations."""
    return at_threads(threads, lambda: [measure(case, repeats, warmup, budget_s, peers=peers)
                                        for case in cases or default_cases()])


__all__ = ["MODES", "Peer", "SparseCase", "default_cases", "implementations", "measure", "rows"]
