"""Built-in models, sized from the data: LeNet-300-100, Conv-4, a small transformer and an LSTM/GRU.

Each factory takes the per-sample ``input_shape`` and ``num_classes`` of the data set and
its own options, so one recipe line picks a model: ``model: {name: conv4, width: 0.5}``.
Layers have names that read well in reports (``fc1``, ``conv2``, ``blocks.0.attn``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers.topk import TopK
from .registry import Registry

MODELS = Registry("model", fixed=("input_shape", "num_classes"))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """A built-in model by name: ``lenet_300_100``, ``conv4``, ``transformer`` or ``rnn``."""
    return MODELS.build(name, tuple(input_shape), num_classes, **options)


@MODELS.register("lenet_300_100")
def lenet_300_100(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (300, 100),
                  topk_fraction: float | None = None) -> nn.Module:
    """The fully connected LeNet-300-100 of LeCun et al. (1998): flatten → 300 → 100 → classes.

    ``topk_fraction``: after each ReLU, keep only the largest ``topk_fraction`` of the layer's
    activations per sample (a :class:`~sparsenets.layers.TopK` module ``topk1``, ``topk2``, ...).
    """
    if topk_fraction is not None and not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
    sizes = [math.prod(input_shape), *hidden, num_classes]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(n_in, n_out)
        if i < len(sizes) - 1:
            layers[f"relu{i}"] = nn.ReLU()
            if topk_fraction is not None:
                layers[f"topk{i}"] = TopK(max(1, round(topk_fraction * n_out)))
    return nn.Sequential(layers)


class Conv4(nn.Module):
    """Conv-4 of Frankle & Carbin (2019): conv-conv-pool twice, then two hidden fully connected layers.

    1-D convolutions for (length,) inputs such as MNIST-1D, 2-D for (height, width) images;
    a missing channel axis is added.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (64, 64, 128, 128),
                 hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        if len(input_shape) not in (1, 2, 3):
            raise ValueError(f"conv4 takes (length,), (height, width) or (channels, h, w) inputs, got {input_shape}")
        spatial = input_shape if len(input_shape) < 3 else input_shape[1:]
        self.add_channel = len(input_shape) < 3
        in_channels = 1 if self.add_channel else input_shape[0]
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)
        if len(channels) != 4:
            raise ValueError(f"conv4 needs 4 channel counts, got {list(channels)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, out_channels in enumerate(channels, start=1):
            layers[f"conv{i}"] = conv(in_channels, out_channels, 3, padding=1)
            layers[f"relu{i}"] = nn.ReLU()
            if i % 2 == 0:
                layers[f"pool{i // 2}"] = pool(2)
            in_channels = out_channels
        self.features = nn.Sequential(layers)
        flat = channels[-1] * math.prod(s // 4 for s in spatial)
        self.classifier = lenet_300_100((flat,), num_classes, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.unsqueeze(1) if self.add_channel else x))


@MODELS.register("conv4")
def conv4(input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (64, 64, 128, 128),
          hidden: Sequence[int] = (256, 256)) -> nn.Module:
    return Conv4(input_shape, num_classes, channels, hidden)


def as_sequence(input_shape: tuple[int, ...], patch: int, model: str) -> tuple[int, int]:
    """(steps, features per step): a (length,) signal in chunks of ``patch``, an image row by row."""
    if len(input_shape) == 1:
        if input_shape[0] % patch:
            raise ValueError(f"{model}: patch {patch} does not divide the input length {input_shape[0]}")
        return input_shape[0] // patch, patch
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise ValueError(f"{model} takes (length,) or (height, width) inputs, got {input_shape}")


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: ``nn.MultiheadAttention`` then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, mlp_ratio * dim), act=nn.GELU(), fc2=nn.Linear(mlp_ratio * dim, dim)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.attn(h, h, h, need_weights=False)[0])
        return x + self.dropout(self.mlp(self.norm2(x)))


class TransformerClassifier(nn.Module):
    """A small encoder over the input as a sequence, mean-pooled into a linear classifier.

    A (length,) signal is a sequence of ``length / patch`` tokens of ``patch`` values;
    a (height, width) image is a sequence of its rows.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int = 32, heads: int = 4,
                 layers: int = 2, mlp_ratio: int = 2, patch: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        tokens, features = self.token_shape = as_sequence(input_shape, patch, "transformer")
        self.embed = nn.Linear(features, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(len(x), *self.token_shape)) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


@MODELS.register("transformer")
def transformer(input_shape: tuple[int, ...], num_classes: int, dim: int = 32, heads: int = 4, layers: int = 2,
                mlp_ratio: int = 2, patch: int = 1, dropout: float = 0.0) -> nn.Module:
    return TransformerClassifier(input_shape, num_classes, dim, heads, layers, mlp_ratio, patch, dropout)


class RecurrentClassifier(nn.Module):
    """An LSTM or GRU over the input read as a sequence, classifying from its last hidden state.

    A (length,) input is read in chunks of ``patch`` values per step (MNIST-1D's 40 values with
    ``patch: 4`` are 10 steps of 4); a (height, width) image is a sequence of its rows.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, cell: str = "lstm", hidden: int = 128,
                 layers: int = 1, patch: int = 1) -> None:
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise ValueError(f"rnn: unknown cell {cell!r}; choose from {', '.join(cells)}")
        self.step_shape = as_sequence(input_shape, patch, "rnn")
        self.rnn = cells[cell](self.step_shape[1], hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.reshape(len(x), *self.step_shape))
        return self.head(out[:, -1])


@MODELS.register("rnn")
def rnn(input_shape: tuple[int, ...], num_classes: int, cell: str = "lstm", hidden: int = 128, layers: int = 1,
        patch: int = 1) -> nn.Module:
    return RecurrentClassifier(input_shape, num_classes, cell, hidden, layers, patch)
