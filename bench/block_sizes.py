"""Speedup of block-sparse Linear layers over dense ones across block shapes.

    python bench/block_sizes.py --sparsity 0.9 --batch 512 --json block_sizes.json

Same measurement as ``sparsenets bench`` (interleaved rounds, medians), restricted to dense
vs this library, for each block shape in turn.
"""

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sparsenets.bench import Case, machine, run
from sparsenets.utils.atomic import write_json

BLOCKS = [(1, 32), (4, 4), (8, 8), (16, 16), (32, 1), (32, 32), (64, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2048x2048", help="out x in")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--mode", choices=["forward", "forward+backward"], default="forward")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))

    rows = []
    for block in BLOCKS:
        rows += run([Case(shape, args.sparsity, args.batch, args.mode)], block, ["dense", "sparsenets"],
                    args.repeats, warmup=2)
    table = Table(title=f"{args.shape}, {args.sparsity:.0%} of blocks removed, batch {args.batch}, {args.mode}")
    for col in ("block", "dense ms", "sparsenets ms", "speedup", "of ideal"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["pattern"].split(":")[1], f"{row['ms']['dense']:.3g}", f"{row['ms']['sparsenets']:.3g}",
                      f"{row['speedup']['sparsenets']:.2f}x", f"{row['fraction_of_ideal']['sparsenets']:.0%}")
    Console().print(table)
    if args.json:
        write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
