"""Patterns: the structure a mask promises.

Every pattern works on a weight in GEMM form, ``rows = outputs`` × ``cols = inputs``
(a conv filter bank is ``out × in·kh·kw``). Most patterns partition the matrix into
groups and return a map from each element to its group id: selection then ranks whole
groups. N:M is different: it keeps the best N inside every run of M inputs, so it
selects locally instead (:meth:`NM.select`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PatternError



@dataclass(frozen=True)
class Pattern:
    """Base class. ``fixed_density`` is set by patterns that decide the density themselves."""

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def fixed_density(self) -> float | None:
        return None

    @property
    def masks_bias(self) -> bool:
        """Whether a pruned group takes the matching bias entries with it (whole outputs)."""
        return False

    def check(self, rows: int, cols: int, layer: str) -> None:
        """Raise :class:`PatternError` if a ``rows × cols`` weight can't take this pattern."""

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        """Map each element of a ``rows × cols`` matrix to a group id in ``[0, n_groups)``."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unstructured(Pattern):
    @property
    def name(self) -> str:
        return "unstructured"

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        return torch.arange(rows * cols).view(rows, cols), rows * cols


@dataclass(frozen=True)
class Block(Pattern):
    """``r × c`` tiles; ``Block(r, 1)`` is a column strip inside a row-block, ``Block(1, c)`` a row strip.

    Where the shape doesn't divide, the last row/column of tiles is smaller (edge blocks).
    """

    r: int
    c: int

    def __post_init__(self) -> None:
        if self.r < 1 or self.c < 1:
            raise PatternError(f"block sides must be >= 1, got {self.r}x{self.c}")

    @property
    def name(self) -> str:
        return f"block:{self.r}x{self.c}"

    def check(self, rows: int, cols: int, layer: str) -> None:
        if self.r > rows or self.c > cols:
            raise PatternError(
                f"block {self.r}x{self.c} is larger than the weight of layer '{layer}' "
                f"({rows}x{cols}, out x in); use a smaller block or exclude the layer"
            )

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        n_col_blocks = -(-cols // self.c)
        n_row_blocks = -(-rows // self.r)
        row_block = torch.arange(rows) // self.r
        col_block = torch.arange(cols) // self.c
        return row_block[:, None] * n_col_blocks + col_block[None, :], n_row_blocks * n_col_blocks


@dataclass(frozen=True)
class Channel(Pattern):
    """Whole output rows: neurons of a Linear, filters of a Conv (with their bias)."""

    @property
    def name(self) -> str:
        return "channel"

    @property
    def masks_bias(self) -> bool:
        return True

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        return torch.arange(rows)[:, None].expand(rows, cols), rows


@dataclass(frozen=True)
class Head(Pattern):
    """Whole attention heads: their query/key/value rows and their output-projection columns.

    Group ids come from the attention module's layout (see ``targets.py``), not from a shape.
    """

    @property
    def name(self) -> str:
        return "head"

    @property
    def masks_bias(self) -> bool:
        return True

    def check(self, rows: int, cols: int, layer: str) -> None:
        raise PatternError(
            f"pattern 'head' applies to attention modules only, not to layer '{layer}'"
        )


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` nonzeros in every run of ``m`` consecutive inputs (the GEMM columns)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise PatternError(f"N:M needs 1 <= N < M, got {self.n}:{self.m}")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_density(self) -> float:
        return self.n / self.m

    def check(self, rows: int, cols: int, layer: str) -> None:
        if cols % self.m:
            raise PatternError(
                f"pattern {self.name} needs the input size of layer '{layer}' to be a multiple "
                f"of {self.m}, but it has {cols} inputs per output (in·kh·kw); exclude the layer "
                f"or give it another pattern in 'overrides'"
            )

    def select(self, scores: Tensor) -> Tensor:
        """Keep the ``n`` highest scores in every run of ``m`` columns; returns a bool mask."""
        rows, cols = scores.shape
        runs = scores.reshape(rows, cols // self.m, self.m)
        keep = torch.zeros_like(runs, dtype=torch.bool)
        keep.scatter_(-1, runs.topk(self.n, dim=-1).indices, True)
        return keep.reshape(rows, cols)


_BLOCK = re.compile(r"^block:(\d+)(?:x(\d+))?$")
_NM = re.compile(r"^(\d+):(\d+)$")
PATTERN_NAMES = ("unstructured", "block:RxC", "N:M", "channel", "head")


def parse_pattern(spec: str | Pattern) -> Pattern:
    """``"unstructured"``, ``"block:32x32"`` (or ``"block:32"``), ``"2:4"``, ``"channel"``, ``"head"``."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"pattern must be a string or Pattern, got {spec!r}")
    text = spec.strip().lower()
    simple = {"unstructured": Unstructured(), "channel": Channel(), "head": Head()}
    if text in simple:
        return simple[text]
    if match := _BLOCK.match(text):
        r = int(match[1])
        return Block(r, int(match[2]) if match[2] else r)
    if match := _NM.match(text):
        return NM(int(match[1]), int(match[2]))
    raise PatternError(f"unknown pattern {spec!r}; expected one of {', '.join(PATTERN_NAMES)}")
