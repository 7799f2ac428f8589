"""SparseDrop vs nn.Dropout + nn.Linear: the time of one training step (forward + backward).

    python bench/sparse_drop.py speed            # median of repeats, 2 threads

Ratios come from one run, so they compare like with like on a shared machine. Regularisation
is an experiment: ``sparsenets run recipes/sparse_drop_mnist1d.yaml``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sparsenets.layers import SparseDrop


def _step_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):  # two warm-ups
        start = time.perf_counter()
        model(x).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def speed(repeats: int, block: int) -> None:
    torch.set_num_threads(2)
    print(f"{'shape (batch, in, out)':>24}  {'p':>4}  {'Dropout+Linear ms':>17}  {'SparseDrop ms':>13}  {'ratio':>6}")
    for batch, n_in, n_out in ((512, 2048, 2048), (512, 4096, 4096), (2048, 2048, 2048)):
        x = torch.randn(batch, n_in, requires_grad=True)
        for p in (0.2, 0.5):
            torch.manual_seed(0)
            dense = nn.Sequential(nn.Dropout(p), nn.Linear(n_in, n_out)).train()
            sparse = SparseDrop.from_linear(dense[1], p, block).train()
            t_dense, t_sparse = _step_ms(dense, x, repeats), _step_ms(sparse, x, repeats)
            print(f"{f'{batch}x{n_in}x{n_out}':>24}  {p:>4}  {t_dense:>17.1f}  {t_sparse:>13.1f}  "
                  f"{t_dense / t_sparse:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed",))
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per configuration")
    parser.add_argument("--block", type=int, default=32, help="SparseDrop feature-block size")
    args = parser.parse_args()
    speed(args.repeats, args.block)


if __name__ == "__main__":
    main()
