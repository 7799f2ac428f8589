"""Speedup of block-sparse convolutions over nn.Conv2d / nn.Conv1d, forward and forward+backward.

    python bench/conv_kernels.py --threads 2 --json conv_kernels.json

Interleaved rounds, medians (:mod:`sparsenets.bench.conv`): dense, this library's layer, and the
same layer on unfolded patches; speedups are the median of per-round ratios to dense. Cases:
256->256 3x3 28x28 batch 32 at 90/75/50% block sparsity (32x32 blocks), 64->64 56x56 and a
Conv1d at 90%.
"""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparsenets.bench import machine
from sparsenets.bench.conv import IMPLEMENTATIONS, MODES, compress_picks, default_cases, ideal, rows
from sparsenets.kernels.cpu import conv
from sparsenets.utils.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--skip-unfold", action="store_true", help="leave out the unfolded-patches reference")
    parser.add_argument("--compress", action="store_true",
                        help="also show what sparsenets.compress picks for a small CNN at 90%% block sparsity")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()
    modes = MODES if args.mode == "both" else (args.mode,)
    impls = tuple(name for name in IMPLEMENTATIONS if not (args.skip_unfold and name == "unfold"))
    found = rows(args.threads, args.repeats, default_cases(modes), impls=impls)

    table = Table(title=f"Block-sparse convolutions: median ms (median per-round speedup over dense); "
                        f"{conv.describe()}")
    for col in ("layer", "sparsity", "mode", *impls, "ideal"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in found:
        cells = [f"{row['ms'][name]:.3g}" + ("" if name == "dense" else f" ({row['paired_speedup'][name]:.2f}x)")
                 for name in impls]
        mode = {"forward": "fwd", "forward+backward": "fwd+bwd"}[row["mode"]]
        table.add_row(row["layer"], f"{row['sparsity']:.0%}", mode, *cells, f"{ideal(row):.1f}x")
    Console(width=160).print(table)
    picks = compress_picks() if args.compress else []
    for pick in picks:
        print(f"compress picked {pick['kind']!r} for layer {pick['layer']} {tuple(pick['shape'])} "
              f"(density {pick['density']:.2f}, {pick['how']}: {pick['ms']})")
    if args.json:
        write_json(args.json, {"machine": {**machine(), "conv_kernels": conv.describe()}, "rows": found,
                               "compress": picks})


if __name__ == "__main__":
    main()
