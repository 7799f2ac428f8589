"""``sparsenets bench --suite``: every kernel against its dense counterpart, with its goal, in one table.

The rows: block-sparse Linear (2048², 32×32, 8×8 and 4×4 blocks, batch 512 and 1, forward and
forward + backward), block-sparse Conv2d against ``nn.Conv2d``, N:M and unstructured Linear
against dense ``F.linear`` (torch CSR beside them), and whole compressed transformer blocks
(:mod:`sparsenets.bench.end_to_end`) at one thread and at all of them. Each row comes from one
interleaved timing of dense and sparse (:mod:`sparsenets.utils.timing`), so the speedup is a
ratio measured under the same conditions. ``goal`` is the speedup the kernels aim for on a
2-core x86 machine at 2 threads (None: reported, no goal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Case, measure

LINEAR_SHAPE = (2048, 2048)


@dataclass(frozen=True)
class LinearGoal:
    block: int
    sparsity: float
    batch: int
    mode: str
    goal: float | None


LINEAR_GOALS = (
    LinearGoal(32, 0.9, 512, "forward", 8.0),
    LinearGoal(32, 0.75, 512, "forward", 3.5),
    LinearGoal(32, 0.5, 512, "forward", 1.8),
    LinearGoal(32, 0.9, 512, "forward+backward", 7.0),
    LinearGoal(32, 0.9, 1, "forward", 5.0),
    LinearGoal(8, 0.9, 512, "forward", 6.0),
    LinearGoal(8, 0.75, 512, "forward", 3.0),
    LinearGoal(8, 0.9, 512, "forward+backward", 5.0),
    LinearGoal(4, 0.9, 512, "forward", 4.0),
    LinearGoal(4, 0.75, 512, "forward", 2.0),
)


def _row(kind: str, case: str, batch: int, mode: str, dense_ms: float, sparse_ms: float,
         goal: float | None, peers: dict[str, float] | None = None) -> dict:
    return {"kind": kind, "case": case, "batch": batch, "mode": mode, "threads": torch.get_num_threads(),
            "dense_ms": dense_ms, "sparsenets_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "goal": goal, "peers": peers or {}}


def linear_rows(repeats: int, goals: tuple[LinearGoal, ...] = LINEAR_GOALS) -> list[dict]:
    rows = []
    for g in goals:
        found = measure(Case(LINEAR_SHAPE, g.sparsity, g.batch, g.mode), (g.block, g.block),
                        ["dense", "sparsenets"], repeats, warmup=2)
        ms = found["ms"]
        rows.append(_row("linear", f"{g.block}x{g.block} blocks, {g.sparsity:.0%}", g.batch, g.mode,
                         ms["dense"], ms["sparsenets"], g.goal))
    return rows


def end_to_end_rows(repeats: int, threads: list[int]) -> list[dict]:
    from .end_to_end import rows as e2e

    out = []
    for r in e2e(threads, repeats=repeats):
        name = {"mlp": "MLP 1024-4096-1024", "llama": "Llama layer (1024, 16 heads, FFN 2816)"}[r["model"]]
        row = _row("end to end", f"{name}, 90% 32x32, {r['threads']} thread(s)", r["rows"], "forward",
                   r["ms"]["dense"], r["ms"]["sparsenets"], 4.0)
        row["threads"] = r["threads"]
        out.append(row)
    return out


PEER_NAMES = {"torch_csr": "torch CSR", "sparselab": "SparseLab", "unfold": "im2col"}


def _peers(found: dict) -> dict[str, float]:
    return {PEER_NAMES.get(k, k): v for k, v in found["speedup"].items() if k not in ("dense", "sparsenets")}


def conv_rows(repeats: int, quick: bool = False) -> list[dict]:
    """Block-sparse Conv2d (32×32 blocks) against nn.Conv2d; the im2col path beside it."""
    from .conv import ConvCase
    from .conv import measure as measure_conv

    cases: list[tuple[ConvCase, float | None]] = [(ConvCase((256, 256), 3, (28, 28), 32, 0.9), 3.0)]
    if not quick:
        cases += [(ConvCase((256, 256), 3, (28, 28), 32, 0.9, "forward+backward"), None),
                  (ConvCase((256, 256), 3, (28, 28), 32, 0.75), None),
                  (ConvCase((64, 64), 3, (56, 56), 32, 0.9), None)]
    out = []
    for case, goal in cases:
        found = measure_conv(case, repeats)
        out.append(_row("conv", f"{case.label}, {case.sparsity:.0%} 32x32", case.batch, case.mode,
                        found["ms"]["dense"], found["ms"]["sparsenets"], goal, _peers(found)))
    return out


def sparse_rows(repeats: int, quick: bool = False) -> list[dict]:
    """Unstructured (CSR) and N:M Linear 2048² against dense; torch CSR (and SparseLab) beside them."""
    from .sparse import SparseCase
    from .sparse import measure as measure_sparse

    cases: list[tuple[SparseCase, float | None]] = [(SparseCase("unstructured", 0.95, 512), 2.0)]
    if not quick:
        cases += [(SparseCase("unstructured", 0.9, 512), 1.0), (SparseCase("unstructured", 0.98, 512), None),
                  (SparseCase("unstructured", 0.95, 512, "forward+backward"), None),
                  (SparseCase("unstructured", 0.95, 1), None),
                  (SparseCase("2:4", 0.5, 512), None), (SparseCase("1:4", 0.75, 512), None),
                  (SparseCase("2:4", 0.5, 512, "forward+backward"), None),
                  (SparseCase("1:4", 0.75, 512, "forward+backward"), None)]
    out = []
    for case, goal in cases:
        found = measure_sparse(case, repeats)
        label = f"unstructured {1 - case.density:.0%}" if case.n_m is None else case.pattern
        out.append(_row("unstructured" if case.n_m is None else "N:M", f"2048x2048, {label}", case.batch,
                        case.mode, found["ms"]["dense"], found["ms"]["sparsenets"], goal, _peers(found)))
    return out


def run(repeats: int = 7, quick: bool = False) -> list[dict]:
    """All rows at torch's current thread count; end to end also at 1 thread."""
    threads = sorted({1, torch.get_num_threads()})
    goals = LINEAR_GOALS[:1] if quick else LINEAR_GOALS
    return (linear_rows(repeats, goals) + conv_rows(repeats, quick) + sparse_rows(repeats, quick)
            + end_to_end_rows(repeats, threads))


def table(rows: list[dict]):
    from rich.table import Table

    out = Table(title="sparsenets against dense: median ms, speedup (goal)", title_justify="left")
    for col in ("kernel", "case", "batch", "mode", "dense", "sparsenets", "speedup", "goal", "peers"):
        out.add_column(col, justify="right" if col in ("batch", "dense", "sparsenets", "speedup", "goal") else "left")
    for row in rows:
        goal = row["goal"]
        met = "" if goal is None else (" ✓" if row["speedup"] >= goal else " ✗")
        peers = ", ".join(f"{k} {v:.2f}x" for k, v in row["peers"].items())
        out.add_row(row["kind"], row["case"], str(row["batch"]),
                    {"forward": "fwd", "forward+backward": "fwd+bwd"}.get(row["mode"], row["mode"]),
                    f"{row['dense_ms']:.3g}", f"{row['sparsenets_ms']:.3g}", f"{row['speedup']:.2f}x{met}",
                    "-" if goal is None else f"≥ {goal:g}x", peers)
    return out
