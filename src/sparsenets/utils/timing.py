"""One timer for comparing implementations: interleaved rounds, every round's time kept.

Each round calls every candidate once, in an order that rotates from round to round, so load
from other processes, clock-speed drift and cache effects hit all of them alike, and each round
gives paired times taken under the same conditions. From them: min and median per candidate,
and per-round ratios between two candidates, whose median (with the distribution-free interval
of :func:`median_interval`) stays honest on a busy machine where single calls stall for a
scheduler time slice. CUDA work is synchronized around each call (kernels return before they
finish).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class Timings:
    """Seconds per timed round, per candidate (one past its budget has fewer rounds)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def min_ms(self) -> dict[str, float]:
        return {name: 1e3 * min(times) for name, times in self.seconds.items() if times}

    def median_ms(self) -> dict[str, float]:
        return {name: 1e3 * statistics.median(times) for name, times in self.seconds.items() if times}

    def extend(self, more: Timings) -> None:
        """Add the rounds of a later run of the same candidates."""
        for name, times in more.seconds.items():
            self.seconds.setdefault(name, []).extend(times)

    def ratios(self, name: str, reference: str) -> list[float]:
        """``name / reference`` in each round both ran."""
        return [a / b for a, b in zip(self.seconds[name], self.seconds[reference]) if b > 0]


def cuda_sync(*tensors: torch.Tensor) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` when any tensor is on a GPU, else None (nothing to wait for)."""
    return torch.cuda.synchronize if any(t.is_cuda for t in tensors) else None


def interleaved(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 200, min_rounds: int = 5,
                warmup: int = 1, budget_s: float | None = None, candidate_budget_s: float | None = None,
                sync: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Time each candidate call in up to ``rounds`` interleaved rounds, after ``warmup`` untimed ones.

    Timing stops after ``min_rounds`` once ``budget_s`` seconds have passed in all; a candidate
    whose own calls have taken ``candidate_budget_s`` stops after ``min_rounds`` while the
    others go on. ``sync`` runs before and after each timed call.
    """
    names = list(candidates)
    timings = Timings({name: [] for name in names})
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    start = clock()
    for round_ in range(rounds):
        if round_ >= min_rounds and budget_s is not None and clock() - start > budget_s:
            break
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times = timings.seconds[name]
            if candidate_budget_s is not None and len(times) >= min_rounds and sum(times) > candidate_budget_s:
                continue
            sync()
            t0 = clock()
            candidates[name]()
            sync()
            times.append(clock() - t0)
    return timings


def median_interval(values: list[float], confidence: float = 0.90) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval for the median of ``values`` (order statistics).

    Each end is a one-sided bound at ``(1 + confidence) / 2``: with 0.90, "the median is below
    ``hi``" is wrong at most 5 % of the time, whatever the distribution (a sign test). Too few
    values for that give ``(0, inf)``.
    """
    ordered, n = sorted(values), len(values)
    tail = (1 - confidence) / 2
    k, below = 0, 0.0  # k: how many values on each side lie outside the interval
    while k < n and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:
        return 0.0, math.inf
    return ordered[k - 1], ordered[n - k]
