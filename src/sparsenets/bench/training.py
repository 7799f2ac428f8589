"""Training steps timed: dense, masked and fast (block-sparse) sparse training, interleaved.

- :func:`mask_cost`: what masks cost, a masked training step (forward, backward, optimizer step)
  against the dense one, on an MLP 784-2048-2048-10 and on the built-in transformer.
- :func:`rigl_steps`: a RigL training step on a wide MLP (three 4096 × 4096 layers, ``block:32x32``)
  or a CNN (three 3×3 convolutions) dense, in masked mode and in fast mode, and the drop-and-grow
  update (block norms of the dense gradient, re-layout and optimizer state included) as a share
  of the time between two updates.

Every model trains with SGD and momentum on random data (batch 256 by default); the steps of all
candidates alternate round by round (:func:`~sparsenets.utils.timing.interleaved`) and each ratio
is the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import timing

UPDATE_EVERY = 100


def _mlp(sizes: Sequence[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers[f"fc{i}" if i < len(sizes) - 1 else "head"] = nn.Linear(n_in, n_out)
        if i < len(sizes) - 1:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


def _transformer(dim: int) -> nn.Module:
    from ..models import build_model

    torch.manual_seed(0)
    return build_model("transformer", (40,), 10, dim=dim, heads=4, layers=2, mlp_ratio=4)


def _trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: Any = None) -> Callable[[], None]:
    """One training step of ``model`` (and the method's bookkeeping, on a step that is no update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if method is not None:
        method.on_train_begin(model, optimizer)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if method is not None:
            method.step(1)  # never an update step: updates are timed on their own
    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def _ratio(timings: timing.Timings, name: str, reference: str) -> float:
    return statistics.median(timings.ratios(name, reference))


def mask_cost(sparsities: Sequence[float] = (0.5, 0.9, 0.99), batch: int = 256, rounds: int = 20,
              models: Sequence[str] = ("mlp", "transformer")) -> list[dict[str, Any]]:
    """Masked (static sparse) training step against dense, per model and sparsity."""
    from ..methods import StaticSparse

    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: _mlp([784, 2048, 2048, 10]),
        "transformer": lambda: _transformer(256)}
    inputs = {"mlp": torch.randn(batch, 784), "transformer": torch.randn(batch, 40)}
    labels = torch.randint(0, 10, (batch,))
    rows = []
    for name in models:
        steps = {"dense": _trainer(builders[name](), inputs[name], labels)}
        for sparsity in sparsities:
            model = builders[name]()
            method = StaticSparse(model, {"sparsity": sparsity, "criterion": "random", "allocation": "uniform"})
            steps[f"{sparsity:g}"] = _trainer(model, inputs[name], labels, method)
        timings = timing.interleaved(steps, rounds=rounds, warmup=2)
        medians = timings.median_ms()
        for sparsity in sparsities:
            key = f"{sparsity:g}"
            rows.append({"model": name, "sparsity": sparsity, "batch": batch, "dense_ms": medians["dense"],
                         "masked_ms": medians[key], "masked_over_dense": _ratio(timings, key, "dense")})
    return rows


def _update_ms(method: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: Any,
               repeats: int = 3) -> float:
    """Median time of RigL's update (scores, drop, grow, re-layout, optimizer state), after the
    forward and backward pass of an update step that captured the dense gradients."""
    times = []
    for i in range(1, repeats + 1):
        step = i * method.update_every
        method._prepare(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        start = time.perf_counter()
        method.update(step)
        times.append(time.perf_counter() - start)
        method._prepare(step + 1)
    return 1e3 * statistics.median(times)


def _cnn(channels: int) -> nn.Module:
    """Three ``channels → channels`` 3×3 convolutions (padding 1), then pooling and a 10-way head."""
    torch.manual_seed(0)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(1, 4):
        layers[f"conv{i}"], layers[f"relu{i}"] = nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()
    layers["pool"], layers["flatten"], layers["head"] = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)
    return nn.Sequential(layers)


def rigl_steps(sparsities: Sequence[float] = (0.8, 0.9, 0.95), width: int = 4096, batch: int = 256,
               block: int = 32, rounds: int = 8, modes: Sequence[str] = ("masked", "fast"),
               model: str = "mlp") -> list[dict[str, Any]]:
    """RigL training steps, dense vs masked vs fast: on an MLP with three ``width²`` layers, or
    (``model="cnn"``) on three ``width → width`` 3×3 convolutions over 16×16 maps."""
    from ..methods import RigL

    builders: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
        "mlp": (lambda: _mlp([width, width, width, width, 10]), (batch, width)),
        "cnn": (lambda: _cnn(width), (batch, width, 16, 16))}
    if model not in builders:
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    build, shape = builders[model]
    x = torch.randn(shape)
    y = torch.randint(0, 10, (batch,))
    steps = {"dense": _trainer(build(), x, y)}
    methods = {}
    for sparsity in sparsities:
        for mode in modes:
            net = build()
            config = {"sparsity": sparsity, "pattern": f"block:{block}x{block}", "criterion": "random",
                      "allocation": "uniform", "exclude": ["head"]}
            method = RigL(net, config, update_every=UPDATE_EVERY, mode=mode)
            key = f"{mode} {sparsity:g}"
            steps[key], methods[key] = _trainer(net, x, y, method), (method, net)
    timings = timing.interleaved(steps, rounds=rounds, warmup=2)
    medians = timings.median_ms()
    rows = []
    for sparsity in sparsities:
        row: dict[str, Any] = {"model": model, "sparsity": sparsity, "width": width, "batch": batch,
                               "block": block, "dense_ms": medians["dense"]}
        for mode in modes:
            key = f"{mode} {sparsity:g}"
            method, net = methods[key]
            update = _update_ms(method, net, x, y, steps[key].optimizer)  # type: ignore[attr-defined]
            row |= {f"{mode}_ms": medians[key], f"{mode}_speedup": _ratio(timings, "dense", key),
                    f"{mode}_update_ms": update,
                    f"{mode}_update_share": update / (update + UPDATE_EVERY * medians[key])}
        rows.append(row)
    return rows
