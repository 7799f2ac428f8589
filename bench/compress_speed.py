"""End-to-end speed of compressed models against their dense (masks baked in) form, on CPU.

For each model and sparsity pattern: sparsify (magnitude, uniform), ``compress`` with autotune
on an example batch, then time the dense and the compressed model in interleaved rounds
(``sparsenets.utils.timing``) on another batch of the same size; figures are medians over
rounds. Prints a markdown table, the per-layer choices with ``--layers``.

    python bench/compress_speed.py [--threads 1] [--batch 1 64] [--layers] [--json speed.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from pathlib import Path

import torch
from torch import nn

import sparsenets as sn
from sparsenets.models import build_model
from sparsenets.utils import atomic, timing


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def cnn() -> nn.Module:
    return build_model("conv4", (3, 32, 32), 10)


MODELS = {"mlp": (mlp, (784,)), "conv4": (cnn, (3, 32, 32))}
CASES = {
    "mlp": [("unstructured", 0.9), ("unstructured", 0.95), ("block:32x32", 0.8), ("block:32x32", 0.9),
            ("channel", 0.5), ("channel", 0.75)],
    "conv4": [("channel", 0.5), ("channel", 0.75), ("block:16x16", 0.8), ("unstructured", 0.9)],
}


def timed(models: dict[str, nn.Module], make_input, rounds: int, seconds: float) -> dict[str, float]:
    """Median milliseconds per forward: at least ``rounds`` interleaved rounds, more within ``seconds``."""
    x = make_input()
    with torch.no_grad():
        found = timing.interleaved({name: functools.partial(model, x) for name, model in models.items()},
                                   rounds=20 * rounds, min_rounds=rounds, budget_s=seconds)
    return found.median_ms()


def run_case(model_name: str, pattern: str, sparsity: float, batch: int, args) -> dict:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    config = {"sparsity": sparsity, "pattern": pattern}
    if pattern.startswith("block"):  # the output layer (10 rows) is smaller than a block
        config["exclude"] = ["4"] if model_name == "mlp" else ["classifier.fc3"]
    sn.sparsify_(model, config)
    make_input = lambda: torch.randn(batch, *shape)  # noqa: E731
    t0 = time.perf_counter()
    compressed = sn.compress(model, make_input(), cache=args.cache)
    compress_seconds = time.perf_counter() - t0
    dense = sn.finalize_(copy.deepcopy(model)).eval()
    times = timed({"dense": dense, "compressed": compressed}, make_input, args.rounds, args.seconds)
    report = compressed.compress_report
    if args.layers:
        print(f"\n{model_name} {pattern} sparsity {sparsity} batch {batch}\n{report}\n")
    return {
        "model": model_name, "pattern": pattern, "sparsity": sparsity, "batch": batch,
        "threads": torch.get_num_threads(), "dense_ms": times["dense"], "compressed_ms": times["compressed"],
        "speedup": times["dense"] / times["compressed"], "params_before": report.params_before,
        "params_after": report.params_after, "compress_s": compress_seconds,
        "kernels": [c.kind for c in report.layers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=30, help="minimum timing rounds (default 30)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per case (default 3)")
    parser.add_argument("--cache", help="autotune cache file to reuse between runs")
    parser.add_argument("--layers", action="store_true", help="print each compressed model's per-layer report")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run_case(m, p, s, b, args) for m in args.models for p, s in CASES[m] for b in args.batch]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | pattern | sparsity | batch | params | dense ms | compressed ms | speedup | kernels | compress s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kernels = ", ".join(f"{k}×{r['kernels'].count(k)}" for k in ("block", "csr", "dense") if k in r["kernels"])
        print(f"| {r['model']} | {r['pattern']} | {r['sparsity']} | {r['batch']} "
              f"| {r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M | {r['dense_ms']:.3f} "
              f"| {r['compressed_ms']:.3f} | {r['speedup']:.2f}× | {kernels} | {r['compress_s']:.1f} |")
    if args.json:
        atomic.write_json(args.json, rows)


if __name__ == "__main__":
    main()
