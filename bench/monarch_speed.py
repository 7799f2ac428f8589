"""CPU speed of MonarchLinear against a dense nn.Linear of the same shape, forward and forward+backward.

A Monarch layer with ``b`` blocks of rank ``q`` does ``q·(in + out)`` multiply-adds per token
where the dense layer does ``in · out``: the "FLOP ratio". Each case times both layers in
interleaved rounds (``sparsenets.utils.timing``); the speedup is the median of the per-round
ratios, and "of FLOP ratio" is how much of the arithmetic saving the measured speedup keeps.
Forward+backward computes the gradients of the input and of every parameter.

    python bench/monarch_speed.py [--threads 2] [--batch 512 2048] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from sparsenets.formats.monarch import MonarchLinear
from sparsenets.utils import timing

# (in, out, nblocks): square at three block counts, and an MLP up-projection
SHAPES = [(2048, 2048, 2), (2048, 2048, 4), (2048, 2048, 8), (2048, 5632, 4)]


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None):
    """One forward (no autograd) or one forward+backward, gradients cleared first so none accumulate."""
    if grad is None:
        def forward() -> None:
            with torch.no_grad():
                layer(x)
        return forward

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
    return forward_backward


def run_case(n: int, m: int, nblocks: int, batch: int, backward: bool, args) -> dict:
    torch.manual_seed(0)
    dense, monarch = nn.Linear(n, m), MonarchLinear(n, m, nblocks)
    x = torch.randn(batch, n, requires_grad=backward)
    grad = torch.randn(batch, m) if backward else None
    found = timing.interleaved({"dense": step(dense, x, grad), "monarch": step(monarch, x, grad)},
                               rounds=20 * args.rounds, min_rounds=args.rounds, warmup=2, budget_s=args.seconds)
    ms = found.median_ms()
    flop_ratio = n * m / monarch.num_parameters()
    speedup = statistics.median(1 / r for r in found.ratios("monarch", "dense"))
    return {"shape": f"{n}→{m}", "format": monarch.format_name(), "batch": batch,
            "mode": "fwd+bwd" if backward else "fwd", "flop_ratio": flop_ratio, "dense_ms": ms["dense"],
            "monarch_ms": ms["monarch"], "speedup": speedup, "fraction": speedup / flop_ratio,
            "rounds": len(found.seconds["monarch"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch", type=int, nargs="+", default=[512, 2048], help="tokens per call (default 512 2048)")
    parser.add_argument("--rounds", type=int, default=15, help="minimum timing rounds (default 15)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per case (default 6)")
    parser.add_argument("--quick", action="store_true", help="batch 512, 5 rounds, 2 s per case")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds, args.seconds = [512], 5, 2.0
    torch.set_num_threads(args.threads)
    rows = [run_case(n, m, b, batch, backward, args) for batch in args.batch for n, m, b in SHAPES
            for backward in (False, True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32\n")
    print("| shape | format | tokens | pass | FLOP ratio | dense ms | monarch ms | speedup | of FLOP ratio | rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['format']} | {r['batch']} | {r['mode']} | {r['flop_ratio']:.2f}× "
              f"| {r['dense_ms']:.1f} | {r['monarch_ms']:.1f} | {r['speedup']:.2f}× | {r['fraction']:.0%} "
              f"| {r['rounds']} |")


if __name__ == "__main__":
    main()
