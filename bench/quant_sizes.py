"""Checkpoint sizes of quantized layers: ``sparsenets.save`` against the float32 safetensors file.

One ``Linear(size, size)`` per case, quantized by round-to-nearest at 8, 4, 3 and 2 bits (one
scale per output channel, and per group of 128 inputs), dense and with half its weights zeroed
before (``quantize_`` keeps zeros as pruned entries: a mask). Prints a markdown table: file size
over the float file, and the ideal ``bits/32 × kept`` beside it; a pruned layer also stores its
mask, one bit per weight.

    python bench/quant_sizes.py [--size 2048]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import sparsenets as sn


def measure(size: int, bits: int, group: int | None, kept: float, folder: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = nn.Linear(size, size)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < kept)
    dense = folder / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(dense))
    model = sn.quantize_(nn.Sequential(layer), sn.QuantConfig(bits=bits, group_size=group))
    path = sn.save(model, folder / "quantized.safetensors")
    return path.stat().st_size / dense.stat().st_size, bits / 32 * kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="the layer is size x size")
    args = parser.parse_args()
    print(f"Linear({args.size}, {args.size}); file / float32 file (ideal bits/32 x kept)\n")
    print("| bits | kept | per channel | groups of 128 | ideal |\n|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for kept in (1.0, 0.5):
            for bits in (8, 4, 3, 2):
                channel, ideal = measure(args.size, bits, None, kept, Path(folder))
                grouped, _ = measure(args.size, bits, 128, kept, Path(folder))
                print(f"| {bits} | {kept:.0%} | {channel:.3f} | {grouped:.3f} | {ideal:.3f} |", flush=True)


if __name__ == "__main__":
    main()
