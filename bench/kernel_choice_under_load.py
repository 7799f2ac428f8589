"""Which kernel ``compress`` keeps for a 90 %-block-sparse Linear, on a quiet CPU and on a loaded one.

    python bench/kernel_choice_under_load.py --repeats 5 --batch 64

A 2048 × 2048 Linear with 90 % of its 32 × 32 blocks removed is compressed ``--repeats``
times (fresh timings each time) with no extra load, then while a background process keeps
``--load-threads`` threads busy with matrix products. Each compress prints the kernel chosen,
how (``timed``, or the density rule when timing was inconclusive), and what the former
best-of-n comparison (fastest single call, 10 % margin) would have chosen from the same rounds.
Then block and dense are timed against each other in interleaved rounds (the timer of
:mod:`sparsenets.utils.timing`): median ms of each and the median per-round speedup.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import sparsenets as sn
from sparsenets.compression import choose
from sparsenets.layers import BlockSparseLinear
from sparsenets.utils import timing

LOAD = """
import sys, torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
a @ a
print("ready", flush=True)
while True:
    a @ a
"""


def best_of_n(rounds: dict[str, list[float]]) -> str:
    """The former rule: fastest single call of each, a sparse kernel must beat dense by 10 %."""
    best = {kind: min(times) for kind, times in rounds.items()}
    sparse = {k: t for k, t in best.items() if k != "dense"}
    fastest = min(sparse, key=sparse.get)
    return fastest if best[fastest] < (1 - choose.MARGIN) * best["dense"] else "dense"


def compress_runs(model: nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    kinds = []
    for run in range(repeats):
        choose._TIMINGS.clear()  # time afresh each run
        start = time.perf_counter()
        layer = sn.compress(model, x).compress_report.layers[0]
        seconds = time.perf_counter() - start
        (rounds,) = choose._TIMINGS.values()
        times = ", ".join(f"{k} {v:.2f}" for k, v in layer.times_ms.items())
        print(f"  compress {run + 1}: {layer.kind:<5} ({layer.how}); median ms {times}; "
              f"{len(rounds['dense'])} rounds; best-of-n would pick {best_of_n(rounds)}; {seconds:.1f} s")
        kinds.append(layer.kind)
    return kinds


def speeds(model: nn.Module, x: torch.Tensor, rounds: int) -> str:
    linear = model[0]
    weight = linear.weight.detach()
    block = BlockSparseLinear.from_dense(weight, weight != 0, linear.bias.detach(), (32, 32))
    dense = nn.Linear(2048, 2048)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(linear.bias)
        found = timing.interleaved({"block": lambda: block(x), "dense": lambda: dense(x)}, rounds=rounds, warmup=3)
    ms = found.median_ms()
    speedup = statistics.median(found.ratios("dense", "block"))
    low, high = timing.median_interval(found.ratios("dense", "block"))
    return (f"  measured over {rounds} interleaved rounds: block {ms['block']:.2f} ms, dense {ms['dense']:.2f} ms, "
            f"block is {speedup:.1f}x faster (median of per-round ratios, 90 % interval {low:.1f}-{high:.1f}x)")


def condition(name: str, model: nn.Module, x: torch.Tensor, args) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{name} (load average {load:.2f}):")
    kinds = compress_runs(model, x, args.repeats)
    print("  kept: " + ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds))))
    print(speeds(model, x, args.rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="compress runs per condition (default 5)")
    parser.add_argument("--batch", type=int, default=64, help="rows of the example input (default 64)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the speed check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    parser.add_argument("--load-threads", type=int, default=2, help="threads of the background load (default 2)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048))
    sn.sparsify_(model, {"sparsity": 0.9, "pattern": "block:32x32"})
    x = torch.randn(args.batch, 2048)
    print(f"Linear 2048x2048, 90 % of 32x32 blocks removed, batch {args.batch}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores, torch {torch.__version__}")
    condition("no extra load", model, x, args)
    busy = subprocess.Popen([sys.executable, "-c", LOAD.format(threads=args.load_threads)],
                            stdout=subprocess.PIPE, text=True)
    try:
        busy.stdout.readline()  # "ready": torch imported and spinning
        time.sleep(1.0)
        condition(f"under load ({args.load_threads} threads of 1024x1024 matmuls in another process)",
                  model, x, args)
    finally:
        busy.kill()
        busy.wait()


if __name__ == "__main__":
    main()
