"""``sparsenets bench``: the command line of :mod:`sparsenets.bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..bench import IMPLEMENTATIONS, MIN_ROUNDS, MODES, Case, machine, run, table
from ..utils import atomic
from ._extras import require_experiments


def _shape(text: str) -> tuple[int, int]:
    try:
        out, inp = (int(v) for v in text.lower().split("x"))
        if out < 1 or inp < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 2048x2048 (out x in), got {text!r}") from None
    return out, inp


def _block(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        r, c = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
        if r < 1 or c < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"block must look like 32x32 or 32, got {text!r}") from None
    return r, c


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


_DESCRIPTION = """\
Time a block-sparse Linear layer against the dense one and other sparse implementations:
dense F.linear, torch's BSR and CSR tensors (torch.sparse.mm), sparsenets' BlockSparseLinear,
and SparseLab's SparseLinear when the optional sparselab package is installed (it has no block
format, so it uses its own random unstructured mask at the same sparsity). All run in one
process on the same weight, in interleaved rounds; each figure is the median over the rounds.

--suite instead runs every kernel against its dense counterpart, with the speedup each one
aims for: block-sparse Linear with 32x32, 8x8 and 4x4 blocks, block-sparse Conv2d, N:M and
unstructured Linear, and compressed transformer blocks end to end at 1 thread and at all of
them (a few minutes). The line under the table names the CPU and the instruction set the
kernels were built for (AVX-512, AVX2, ...).

--training times whole training steps instead: a masked step against a dense one (what masks
cost), and a RigL step dense vs masked vs fast mode (block-sparse layers) on an MLP with three
4096x4096 layers and on three 256-channel 3x3 convolutions, at 80/90/95% sparsity, with the
drop-and-grow update's share of the time between updates (a few minutes; --quick: a smoke test)."""

_EXAMPLES = """\
examples:
  sparsenets bench                                      # the default table, about a minute
  sparsenets bench --sparsities 0.9 --batches 512 --modes forward --impls dense sparsenets
  sparsenets bench --shapes 4096x1024 1024x4096 --block 16x16 --threads 1 --json bench.json
  sparsenets bench --suite --threads 2 --json suite.json   # every kernel, with its goal
  sparsenets bench --training --threads 2                   # sparse training steps vs dense"""


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time block-sparse layers against dense and other sparse implementations",
        description=_DESCRIPTION, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(2048, 2048)], metavar="OUTxIN",
                        help="Linear weight shapes, out x in (default: 2048x2048)")
    parser.add_argument("--sparsities", nargs="+", type=_sparsity, default=[0.5, 0.75, 0.9], metavar="S",
                        help="fractions of blocks removed (default: 0.5 0.75 0.9)")
    parser.add_argument("--batches", nargs="+", type=_positive, default=[512, 1], metavar="N",
                        help="input rows per call (default: 512 1)")
    parser.add_argument("--block", type=_block, default=(32, 32), metavar="RxC",
                        help="block shape, rows x columns of the weight (default: 32x32)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="what one timed step runs (default: both)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        metavar="IMPL", help=f"implementations to compare, from {', '.join(IMPLEMENTATIONS)}; "
                                             f"dense is always included (default: all)")
    parser.add_argument("--repeats", type=_positive, default=7,
                        help="timed rounds; the median is reported (default: 7)")
    parser.add_argument("--warmup", type=_count, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--budget", type=float, default=2.0, metavar="SECONDS",
                        help=f"time one implementation may spend on one case; slower ones stop after "
                             f"{MIN_ROUNDS} timed rounds (default: 2)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="CPU threads (default: torch's current setting)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--suite", action="store_true",
                        help="every kernel against dense with its goal, one table (ignores the case options)")
    parser.add_argument("--training", action="store_true",
                        help="time training steps: masked vs dense, and RigL dense vs masked vs fast mode")
    parser.add_argument("--quick", action="store_true",
                        help="with --suite or --training: small cases, few rounds (a smoke test)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    require_experiments("rich")  # the tables and progress bars; the rest of the extra is not needed
    from rich.console import Console

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite and args.training:
        raise SystemExit("sparsenets bench: choose one of --suite and --training")
    if args.suite:
        return _suite(args)
    if args.training:
        return _training(args)
    if args.quick:
        raise SystemExit("sparsenets bench: --quick goes with --suite or --training (their smoke tests)")
    impls = ["dense"] + [name for name in args.impls if name != "dense"]
    cases = [Case(shape, sparsity, batch, mode) for shape in args.shapes for batch in args.batches
             for mode in args.modes for sparsity in args.sparsities]
    rows = run(cases, args.block, impls, args.repeats, args.warmup, args.budget)
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table(rows, impls))
    notes = {f"{name}: {note}" for row in rows for name, note in row["notes"].items()}
    info = machine()
    load = f", load average {info['load_average'][0]:.2f}" if info["load_average"] else ""
    console.print(f"{info['cpu']} ({info['cores']} cores), {info['threads']} threads, torch {info['torch']}{load}; "
                  f"{info['kernels']}")
    for note in sorted(notes):
        console.print(f"[dim]n/a: {note}[/dim]")
    if "sparselab" in impls:
        console.print("[dim]sparselab: its own random unstructured mask at the same sparsity[/dim]")
    if args.json:
        atomic.write_json(args.json, {"machine": info, "block": list(args.block), "rows": rows})
        console.print(f"wrote {args.json}")
    return 0


def _suite(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench import suite as bench_suite

    rows = bench_suite.run(repeats=3 if args.quick else args.repeats, quick=args.quick)
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(bench_suite.table(rows))
    info = machine()
    load = f", load average {info['load_average'][0]:.2f}" if info["load_average"] else ""
    console.print(f"{info['cpu']} ({info['cores']} cores), {info['threads']} threads, torch {info['torch']}{load}; "
                  f"{info['kernels']}")
    if args.json:
        atomic.write_json(args.json, {"machine": info, "rows": rows})
        console.print(f"wrote {args.json}")
    return 0


def _training(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..bench import training

    quick = args.quick
    masks = training.mask_cost(sparsities=(0.5, 0.9) if quick else (0.5, 0.9, 0.99), rounds=3 if quick else 40,
                               batch=32 if quick else 256)
    sparsities = (0.9,) if quick else (0.8, 0.9, 0.95)
    rigl = training.rigl_steps(sparsities=sparsities, width=512 if quick else 4096,
                               rounds=2 if quick else 8, batch=64 if quick else 256)
    cnn = training.rigl_steps(sparsities=sparsities, width=64 if quick else 256, rounds=2 if quick else 8,
                              batch=4 if quick else 32, model="cnn")
    console = Console() if Console().is_terminal else Console(width=160)
    cost = Table(title="What masks cost: a masked training step over a dense one (goal: <= 1.05x)")
    for column in ("model", "sparsity", "dense ms", "masked ms", "masked / dense"):
        cost.add_column(column, justify="right")
    for row in masks:
        cost.add_row(row["model"], f"{row['sparsity']:.0%}", f"{row['dense_ms']:.1f}", f"{row['masked_ms']:.1f}",
                     f"{row['masked_over_dense']:.3f}x")
    console.print(cost)
    console.print(_steps_table(rigl, f"three {rigl[0]['width']}² linear layers, batch {rigl[0]['batch']} "
                                     f"(goal: fast 3x at 90%, 5x at 95%)"))
    console.print(_steps_table(cnn, f"three {cnn[0]['width']}→{cnn[0]['width']} 3x3 convolutions on 16x16 "
                                    f"maps, batch {cnn[0]['batch']}"))
    info = machine()
    console.print(f"{info['cpu']} ({info['cores']} cores), {info['threads']} threads, torch {info['torch']}; "
                  f"{info['kernels']}")
    if args.json:
        atomic.write_json(args.json, {"machine": info, "mask_cost": masks, "rigl_steps": rigl + cnn})
        console.print(f"wrote {args.json}")
    return 0


def _steps_table(rows: list[dict], what: str):
    from rich.table import Table

    from ..bench import training

    table = Table(title=f"RigL training step, block {rows[0]['block']}x{rows[0]['block']}, {what}")
    for column in ("sparsity", "dense ms", "masked ms", "fast ms", "fast speedup", "masked speedup",
                   "update ms (fast)", f"update share (every {training.UPDATE_EVERY})"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['sparsity']:.0%}", f"{row['dense_ms']:.0f}", f"{row['masked_ms']:.0f}",
                      f"{row['fast_ms']:.0f}", f"{row['fast_speedup']:.2f}x", f"{row['masked_speedup']:.2f}x",
                      f"{row['fast_update_ms']:.0f}", f"{row['fast_update_share']:.1%}")
    return table
