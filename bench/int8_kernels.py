"""int8 linear layers on CPU against fp32, torch's dynamic quantization and torchao.

    python bench/int8_kernels.py [--quick] [--threads 2] [--batch 512] [--size 2048]
                                 [--density 0.1,0.2,0.5] [--block 32x32,16x16]

Rows: fp32 dense (``F.linear``), int8 dense (:class:`sparsenets.layers.int8.Int8Linear`,
``torch._int_mm``), torch dynamic quantization (``torch.ao.quantization.quantize_dynamic``),
torchao's int8 dynamic-activation config (only if ``torchao`` imports), then per block shape and
density the fp32 block-sparse layer (:class:`BlockSparseLinear`) and ours
(:class:`BlockSparseInt8Linear`; on AMX machines also its vector path without AMX). Every
candidate of a table runs once per round, in turn, so a load change on a shared machine hits
them all alike; the table shows medians (and bests) over rounds, with speedups over the fp32
dense product timed in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.kernels.int8 import block_sparse_int8_linear, describe, int8_capabilities
from sparsenets.layers import BlockSparseLinear
from sparsenets.layers.int8 import BlockSparseInt8Linear, Int8Linear


def _block(text: str) -> tuple[int, int]:
    r, _, c = text.partition("x")
    return int(r), int(c or r)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small problem, few rounds (a smoke test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=2048, help="in = out features")
    p.add_argument("--density", default="0.1,0.2,0.5", help="kept fraction of blocks, comma-separated")
    p.add_argument("--block", default="32x32,16x16", help="block shapes rxc, comma-separated")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.rounds = min(args.batch, 64), min(args.size, 256), 3
    args.density = [float(d) for d in args.density.split(",")]
    args.block = [_block(b) for b in args.block.split(",")]
    return args


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """ms of each function in each of ``rounds``, running them in turn within each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def torchao_linear(linear: nn.Linear) -> nn.Module | None:
    """torchao's int8 dynamic-activation int8-weight config on a copy, or None without torchao."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features))
    model.load_state_dict({"0." + k: v for k, v in linear.state_dict().items()})
    try:
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    except Exception as err:  # noqa: BLE001 - any torchao failure only drops its column
        print(f"torchao int8 config failed, column skipped: {err}")
        return None
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(describe())
    n, b = args.size, args.batch
    print(f"in = out = {n}, batch {b}, {args.threads} threads, medians of {args.rounds} interleaved rounds (ms)\n")
    linear = nn.Linear(n, n)
    x = torch.randn(b, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated, still the torch baseline
        dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    int8 = Int8Linear.from_float(linear).eval()
    dense: dict[str, Callable[[], object]] = {
        "fp32 dense (F.linear)": lambda: F.linear(x, linear.weight, linear.bias),
        "int8 dense (sparsenets Int8Linear)": lambda: int8(x),
        "torch quantize_dynamic": lambda: dynamic(x),
    }
    ao = torchao_linear(linear)
    if ao is not None:
        dense["torchao int8 dynamic"] = lambda: ao(x)
    else:
        print("(torchao not importable: its column is skipped)\n")

    # (layer, its times, fp32 dense times of the same interleaved run, fp32 block-sparse times)
    rows: list[tuple[str, list[float], list[float], list[float] | None]] = []
    amx = int8_capabilities()["kernel_amx"]
    with torch.no_grad():
        base = interleaved(dense, args.rounds)
        fp32 = base["fp32 dense (F.linear)"]
        rows += [(name, t, fp32, None) for name, t in base.items()]
        for block in args.block:
            for density in args.density:
                keep = torch.rand(-(-n // block[0]), -(-n // block[1])) < density
                mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :n]
                sparse = BlockSparseLinear.from_dense(linear.weight.detach(), mask, linear.bias, block).eval()
                sparse8 = BlockSparseInt8Linear.from_float(sparse).eval()
                label = f"{block[0]}x{block[1]} d={density:g}"
                fns: dict[str, Callable[[], object]] = {
                    "fp32": lambda: F.linear(x, linear.weight, linear.bias),
                    "sparse": lambda s=sparse: s(x),
                    "sparse8": lambda s=sparse8: s(x),
                }
                if amx:  # the vector (VNNI) kernel too, which runs where AMX doesn't
                    fns["simd"] = lambda s=sparse8: block_sparse_int8_linear(x, s.packed(), s.w_scale, s.bias,
                                                                             path="simd")
                got = interleaved(fns, args.rounds)
                rows.append((f"fp32 block-sparse {label}", got["sparse"], got["fp32"], None))
                rows.append((f"int8 block-sparse {label}{' (AMX)' if amx else ''}", got["sparse8"], got["fp32"],
                             got["sparse"]))
                if amx:
                    rows.append((f"int8 block-sparse {label} (vector path, no AMX)", got["simd"], got["fp32"],
                                 got["sparse"]))

    med, best = statistics.median, min
    print("| layer | median ms | best ms | speedup vs fp32 dense (median, same run) "
          "| int8 / fp32 block-sparse (median) | (best) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, ref, f32 in rows:
        ratio = "| | |" if f32 is None else f"| {med(f32) / med(t):.2f}x | {best(f32) / best(t):.2f}x |"
        print(f"| {name} | {med(t):.2f} | {best(t):.2f} | {med(ref) / med(t):.2f}x {ratio}")


if __name__ == "__main__":
    main()
