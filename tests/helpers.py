"""Small models and data shared by the tests."""

import torch
from torch import nn

from sparsenets.masking import masks


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5),
    )


def batches(model_kind: str, n: int = 2, size: int = 8) -> list:
    shape = (size, 20) if model_kind == "mlp" else (size, 3, 6, 6)
    return [(torch.randn(*shape), torch.randint(0, 5, (size,))) for _ in range(n)]


def mask_of(model: nn.Module, qualname: str) -> torch.Tensor:
    for module_name, _, name, mask in masks(model):
        if f"{module_name}.{name}" == qualname:
            return mask.mask
    raise KeyError(qualname)


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_compiled_matches_eager(model: nn.Module, x: torch.Tensor, **compile_options) -> None:
    """``torch.compile(model, fullgraph=True)`` gives the eager outputs and gradients (input and parameters)."""
    compiled = torch.compile(model, fullgraph=True, **compile_options)
    y, y_ref = compiled(x), model(x)
    torch.testing.assert_close(y, y_ref)
    got = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    want = torch.autograd.grad(y_ref.square().sum(), [x, *model.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
