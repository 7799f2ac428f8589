"""Checkpoint sizes of sparse models: ``sparsenets.save`` against the dense safetensors file.

One ``Linear(2048, 2048)`` per case, masked by ``sparsify_`` with each pattern and sparsity,
saved masked and compressed. Prints a markdown table: file size, dense size, their ratio and
the ratio to ``density × dense`` (what storing only the kept values would take).

    python bench/compress_sizes.py [--size 2048] [--json sizes.json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import sparsenets as sn
from sparsenets.io import read_checkpoint
from sparsenets.masking import masks
from sparsenets.utils import atomic

CASES = [("unstructured", s) for s in (0.5, 0.8, 0.9, 0.95)] + [
    ("block:32x32", s) for s in (0.5, 0.8, 0.9, 0.95)] + [("2:4", 0.5), ("channel", 0.5), ("channel", 0.9)]


def measure(size: int, pattern: str, sparsity: float, folder: Path) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(size, size))
    sn.sparsify_(model, {"sparsity": sparsity, "pattern": pattern})
    density = float(next(masks(model))[3].mask.float().mean())
    dense_path = folder / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in sn.finalize_(copy.deepcopy(model)).state_dict().items()}, str(dense_path))
    dense = dense_path.stat().st_size
    row = {"pattern": pattern, "sparsity": sparsity, "density": density, "dense_bytes": dense}
    for kind, saved in (("masked", model), ("compressed", sn.compress(model.eval(), autotune=False))):
        path = sn.save(saved, folder / f"{kind}.safetensors")
        header, _ = read_checkpoint(path)
        row[f"{kind}_bytes"] = path.stat().st_size
        row[f"{kind}_encoding"] = header["tensors"].get("0.weight", {}).get("encoding", "-")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="the Linear layer is SIZE x SIZE (default 2048)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(args.size, p, s, Path(folder)) for p, s in CASES]
    print(f"Linear({args.size}, {args.size}) with bias; dense file {rows[0]['dense_bytes'] / 1e6:.2f} MB\n")
    print("| pattern | sparsity | density | masked file | compressed file | / dense | / (density × dense) | encoding |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["compressed_bytes"] / r["dense_bytes"]
        print(f"| {r['pattern']} | {r['sparsity']:.2f} | {r['density']:.3f} | {r['masked_bytes'] / 1e6:.2f} MB "
              f"| {r['compressed_bytes'] / 1e6:.2f} MB | {ratio:.3f} | {ratio / r['density']:.3f} "
              f"| {r['compressed_encoding']} |")
    if args.json:
        atomic.write_json(args.json, rows)


if __name__ == "__main__":
    main()
