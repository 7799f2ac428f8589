"""``sparsenets compress``: a sparse checkpoint in, a compressed checkpoint out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

import torch

from ..errors import SparsenetsError
from ..io import load, read_checkpoint, save
from . import BAD_INPUT, SYSTEM_ERROR


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="turn a sparse checkpoint into a smaller, faster one",
        description="Load a checkpoint written by sparsenets.save (a masked model), remove its zero "
                    "neurons, channels and heads, give each sparse layer its fastest kernel (timed on "
                    "this machine), check the outputs are unchanged, and save the result. Prints the "
                    "per-layer report.",
        epilog="examples:\n  sparsenets compress lenet.safetensors lenet-small.safetensors\n"
               "  sparsenets compress conv.safetensors conv-small.safetensors --input-shape 3 32 32 --batch 64\n\n"
               "The checkpoint must rebuild without code: a built-in model (saved with architecture=...)\n"
               "or an nn.Sequential of torch layers. For other models use sparsenets.compress in Python.")
    parser.add_argument("checkpoint", type=Path, help="checkpoint to compress (.safetensors)")
    parser.add_argument("output", type=Path, help="where to write the compressed checkpoint")
    parser.add_argument("--input-shape", type=int, nargs="+", metavar="N",
                        help="shape of one input sample (default: the built-in model's, or the first "
                             "Linear layer's width)")
    parser.add_argument("--batch", type=int, default=1, help="samples per batch that kernels are timed on (default 1)")
    parser.add_argument("--no-autotune", action="store_true", help="choose kernels by a density rule, without timing")
    parser.add_argument("--no-shrink", action="store_true", help="keep zero neurons, channels and heads")
    parser.add_argument("--cache", help="JSON file keeping autotune timings between runs")
    parser.set_defaults(func=_run)


def _sample_shape(header: dict, model: torch.nn.Module, given: list[int] | None) -> list[int]:
    if given:
        return given
    architecture = header["architecture"]
    if architecture.get("kind") == "builtin":
        return list(architecture["spec"]["input_shape"])
    first = next((m for m in model.modules() if hasattr(m, "in_features")), None)
    if first is None:
        raise ValueError("can't tell the input shape of this model: pass --input-shape")
    return [cast(int, first.in_features)]


def _run(args: argparse.Namespace) -> int:
    """Input problems (a damaged checkpoint, bad options) exit 2; a missing file or a failed write exit 1."""
    from ..compression import compress

    if args.batch < 1:
        return _error(f"--batch must be >= 1, got {args.batch}", BAD_INPUT)
    if args.output.is_dir():
        return _error(f"can't write {args.output}: it is a directory", BAD_INPUT)
    try:
        header, _ = read_checkpoint(args.checkpoint)
        model = load(args.checkpoint)
        example = torch.randn(args.batch, *_sample_shape(header, model, args.input_shape))
        compressed = compress(model, example, autotune=not args.no_autotune, shrink=not args.no_shrink,
                              cache=args.cache)
    except FileNotFoundError as err:
        return _error(str(err), SYSTEM_ERROR)
    except (SparsenetsError, ValueError, RuntimeError) as err:
        return _error(str(err), BAD_INPUT)
    print(compressed.compress_report)
    architecture = header["architecture"]
    try:
        save(compressed, args.output, architecture=architecture["spec"] if architecture["kind"] == "builtin" else None,
             config=header.get("config"), metadata=header.get("metadata"))
    except OSError as err:
        return _error(f"can't write {args.output}: {err.strerror or err}", SYSTEM_ERROR)
    before, after = args.checkpoint.stat().st_size, args.output.stat().st_size
    print(f"wrote {args.output} ({after / 1e6:.2f} MB; {args.checkpoint} is {before / 1e6:.2f} MB)")
    return 0


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
