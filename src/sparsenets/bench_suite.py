"""``sparsenets bench --suite``: every kernel against its dense counterpart, with its goal, in one table.

The rows: block-sparse Linear (2048², 32×32, 8×8 and 4×4 blocks, batch 512 and 1, forward and
forward + backward), block-sparse Conv2d against ``nn.Conv2d``, N:M and unstructured Linear
against dense ``F.linear`` (torch CSR beside them), and whole compressed transformer blocks
(:mod:`sparsenets.bench_e2e`) at one thread and at all of them. Each row comes from one
interleaved timing of dense and sparse (:mod:`sparsenets.utils.timing`), so the speedup is a
ratio measured under the same conditions. ``goal`` is the speedup the kernels aim for on a
2-core x86 machine at 2 threads (None: reported, no goal).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bench import Case, measure

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
    from .bench_e2e import rows as e2e

    out = []
    for r in e2e(threads, repeats=repeats):
        name = {"mlp": "MLP 1024-4096-1024", "llama": "Llama layer (1024, 16 heads, FFN 2816)"}[r["model"]]
        row = _row("end to end", f"{name}, 90% 32x32, {r['threads']} thread(s)", r["rows"], "forward",
                   r["ms"]["dense"], r["ms"]["sparsenets"], 4.0)
        row["threads"] = r["threads"]
        out.append(row)
    return out


# Rows from the other kernel families' benchmark modules, each ``rows(repeats) -> list[dict]``
# in this module's row format; a family whose module is missing is left out.
FAMILIES: dict[str, str] = {}


def family_rows(repeats: int) -> list[dict]:
    out = []
    for module in FAMILIES.values():
        rows: Callable[[int], list[dict]] = importlib.import_module(module).suite_rows
        out.extend(rows(repeats))
    return out


def run(repeats: int = 7, quick: bool = False) -> list[dict]:
    """All rows at torch's current thread count; end to end also at 1 thread."""
    threads = sorted({1, torch.get_num_threads()})
    goals = LINEAR_GOALS[:1] if quick else LINEAR_GOALS
    return linear_rows(repeats, goals) + family_rows(repeats) + end_to_end_rows(repeats, threads)


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
