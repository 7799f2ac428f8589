"""SparseDrop vs nn.Dropout + nn.Linear: training-step speed, and regularisation on MNIST-1D.

    python bench/sparse_drop.py speed            # fwd+bwd step, median of repeats, 2 threads
    python bench/sparse_drop.py regularise       # MLP on MNIST-1D, 3 seeds (2-4 minutes on 2 cores)

Speed ratios come from one run, so they compare like with like on a shared machine.
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


def _mlp(dropout: str, p: float, block: int, width: int = 512) -> nn.Sequential:
    def layer(n_in: int, n_out: int, drop: bool) -> list[nn.Module]:
        if not drop or dropout == "none":
            return [nn.Linear(n_in, n_out)]
        if dropout == "dropout":
            return [nn.Dropout(p), nn.Linear(n_in, n_out)]
        return [SparseDrop(n_in, n_out, p, block)]
    # Dropout on the hidden activations only (inputs of layers 2 and 3), as in Srivastava et al.
    return nn.Sequential(*layer(40, width, False), nn.ReLU(), *layer(width, width, True), nn.ReLU(),
                         *layer(width, 10, True))


def regularise(epochs: int, seeds: int, p: float, block: int) -> None:
    from sparsenets.experiments.data import load_dataset

    torch.set_num_threads(2)
    data = load_dataset("mnist1d")
    print(f"MNIST-1D {len(data.y_train)} train / {len(data.y_test)} test, MLP 40-512-512-10, "
          f"Adam 1e-3, batch 128, {epochs} epochs, p={p}, block={block}")
    for kind in ("none", "dropout", "sparsedrop"):
        accs, train_accs = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = _mlp(kind, p, block)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(epochs):
                model.train()
                for idx in torch.randperm(len(data.y_train)).split(128):
                    loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            model.eval()
            with torch.no_grad():
                accs.append((model(data.x_test).argmax(1) == data.y_test).float().mean().item())
                train_accs.append((model(data.x_train).argmax(1) == data.y_train).float().mean().item())
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{kind:>10}: test {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} %   "
              f"train {100 * statistics.mean(train_accs):.1f} %   ({', '.join(f'{100 * a:.1f}' for a in accs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "regularise"))
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (speed)")
    parser.add_argument("--block", type=int, default=32, help="SparseDrop feature-block size")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (regularise)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (regularise)")
    parser.add_argument("--p", type=float, default=0.5, help="drop probability (regularise)")
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.repeats, args.block)
    else:
        regularise(args.epochs, args.seeds, args.p, args.block)


if __name__ == "__main__":
    main()
