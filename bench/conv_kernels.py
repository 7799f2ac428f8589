"""Speedup of block-sparse convolutions over nn.Conv2d / nn.Conv1d, forward and forward+backward.

    python bench/conv_kernels.py --threads 2 --json conv_kernels.json

Interleaved rounds, medians (:mod:`sparsenets.bench_conv`): dense, this library's layer, and the
same layer on unfolded patches. Cases: 256->256 3x3 28x28 batch 32 at 90/75/50% block sparsity
(32x32 blocks), 64->64 56x56 and a Conv1d at 90%.
"""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparsenets.bench import machine
from sparsenets.bench_conv import MODES, default_cases, ideal, rows
from sparsenets.kernels.cpu import conv
from sparsenets.utils.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()
    modes = MODES if args.mode == "both" else (args.mode,)
    found = rows(args.threads, args.repeats, default_cases(modes))

    table = Table(title=f"Block-sparse convolutions, median ms (speedup over dense); {conv.describe()}")
    for col in ("layer", "sparsity", "mode", "dense", "sparsenets", "unfold", "ideal"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in found:
        cells = [f"{row['ms'][name]:.3g}" + ("" if name == "dense" else f" ({row['speedup'][name]:.2f}x)")
                 for name in ("dense", "sparsenets", "unfold")]
        mode = {"forward": "fwd", "forward+backward": "fwd+bwd"}[row["mode"]]
        table.add_row(row["layer"], f"{row['sparsity']:.0%}", mode, *cells, f"{ideal(row):.1f}x")
    Console(width=160).print(table)
    if args.json:
        write_json(args.json, {"machine": {**machine(), "conv_kernels": conv.describe()}, "rows": found})


if __name__ == "__main__":
    main()
