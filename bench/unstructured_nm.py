"""Speedup of unstructured (CSR) and N:M sparse Linear layers over dense ones, beside torch CSR and SparseLab.

    python bench/unstructured_nm.py --threads 2 --json unstructured_nm.json

One 2048×2048 layer per row: unstructured at 90/95/98% (batch 512 and 1), 2:4, 1:4 and 2:8
(batch 512 and 64), forward and forward+backward. Measured by :mod:`sparsenets.bench.sparse`
(interleaved rounds, medians); SparseLab's column appears when it is installed.
"""

import argparse
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from sparsenets.bench import machine
from sparsenets.bench.sparse import MODES, Peer, SparseCase, default_cases, rows
from sparsenets.utils.atomic import write_json

PEERS = ("sparsenets", "torch_csr", "sparselab")


def sparselab_peer() -> Peer | None:
    """SparseLab's ``SparseLinear`` holding the case's weight, or None when it is not installed."""
    if importlib.util.find_spec("sparselab") is None:
        return None
    # SparseLab bundles a second OpenMP runtime: passive waiting keeps its idle threads off the
    # cores the others are timed on (read when it loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import sparselab

    def build(weight: Tensor, bias: Tensor):
        sparselab.ops._clear_transpose_cache()  # keyed by id(): a dead layer's entry would match a new one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = sparselab.SparseLinear(weight.shape[1], weight.shape[0], sparsity=0.5)
            layer._csr = sparselab.PaddedCSR.from_dense(weight, padding_ratio=0.0)
        layer._values = nn.Parameter(torch.from_numpy(np.asarray(layer._csr.values)))  # its kernels read this alias
        with torch.no_grad():
            layer.bias.copy_(bias)
        return layer, list(layer.parameters())
    return build


def _cell(row: dict, name: str) -> str:
    if name not in row["ms"]:
        return "-"
    return f"{row['ms'][name]:.3g} ({row['speedup'][name]:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--shape", default="2048x2048", help="out x in")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per implementation and case")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    modes = MODES if args.mode == "both" else (args.mode,)
    cases = [SparseCase(c.pattern, c.sparsity, c.batch, c.mode, shape) for c in default_cases(modes)]
    peer = sparselab_peer()
    found = rows(args.threads, args.repeats, cases, budget_s=args.budget, peers={"sparselab": peer} if peer else None)

    table = Table(title=f"{args.shape} Linear, {args.threads or torch.get_num_threads()} threads: "
                        f"median ms (speedup over dense)")
    for col in ("format", "sparsity", "batch", "mode", "dense ms", *(f"{p} ms" for p in PEERS)):
        table.add_column(col, justify="right")
    for row in found:
        table.add_row(row["pattern"], f"{row['sparsity']:.0%}", str(row["batch"]), row["mode"],
                      f"{row['ms']['dense']:.3g}", *(_cell(row, p) for p in PEERS))
    Console(width=150).print(table)
    if args.json:
        write_json(args.json, {"machine": machine(), "rows": found})


if __name__ == "__main__":
    main()
