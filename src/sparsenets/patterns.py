"""Patterns: the structure a mask promises, and every decision that depends on it.

Every pattern works on a weight in GEMM form, ``rows = outputs`` × ``cols = inputs``
(a conv filter bank is ``out × in·kh·kw``). Most patterns partition the matrix into
groups and return a map from each element to its group id: selection then ranks whole
groups. N:M is different: it keeps the best N inside every run of M inputs, so it
selects locally instead (:meth:`NM.select`).

The rest of the package asks a pattern what it needs (``selects_locally``, ``scope``,
``allowed_allocations``, ``at_density``, ``supports_rewiring``, ``block_shape``, ``n_m``)
instead of testing its class, so a new pattern is one class here, registered with
:func:`register_pattern`, and :func:`parse_pattern` knows its syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .errors import PatternError

_REGISTRY: list[type[Pattern]] = []

MIXED = "mixed"  # the pattern name of a mask that no single pattern describes (see sparsify_)


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: :func:`parse_pattern` tries ``cls.parse(text)`` and lists ``cls.syntax``."""
    _REGISTRY.append(cls)
    return cls


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses set ``syntax`` and override what differs from a plain grouping."""

    syntax: ClassVar[str] = ""  # how the pattern is written in a config, e.g. "block:RxC"

    @classmethod
    def parse(cls, text: str) -> Pattern | None:
        """The pattern ``text`` (lower-case, stripped) spells, or None; by default the literal syntax."""
        return cls() if text == cls.syntax else None

    @property
    def name(self) -> str:
        return self.syntax

    @property
    def fixed_density(self) -> float | None:
        """The kept fraction the pattern itself decides (N:M), or None when the allocation does."""
        return None

    @property
    def masks_bias(self) -> bool:
        """Whether a pruned group takes the matching bias entries with it (whole outputs)."""
        return False

    @property
    def scope(self) -> str:
        """What one target covers: ``"layer"`` (one weight) or ``"attention"`` (one attention module)."""
        return "layer"

    @property
    def selects_locally(self) -> bool:
        """True when the mask comes from :meth:`select` inside each weight, not from ranked groups."""
        return False

    @property
    def elementwise(self) -> bool:
        """True when every element is its own group (so per-row comparisons, as Wanda's, apply)."""
        return False

    @property
    def allowed_allocations(self) -> tuple[str, ...] | None:
        """The allocations that make sense with this pattern; None for all of them."""
        return None

    @property
    def supports_rewiring(self) -> bool:
        """Whether sparse training may drop and regrow its groups (all weight groups, no bias)."""
        return False

    @property
    def block_shape(self) -> tuple[int, int] | None:
        """``(r, c)`` for block patterns (what block-sparse kernels need), else None."""
        return None

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for N:M patterns, else None."""
        return None

    def at_density(self, density: float) -> Pattern | None:
        """The pattern to prune with at an intermediate kept fraction on the way to this one;
        None while that is still dense."""
        return self if density < 1.0 else None

    def check(self, rows: int, cols: int, layer: str) -> None:
        """Raise :class:`PatternError` if a ``rows × cols`` weight can't take this pattern."""

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        """Map each element of a ``rows × cols`` matrix to a group id in ``[0, n_groups)``."""
        raise NotImplementedError

    def select(self, scores: Tensor) -> Tensor:
        """Local selection (only where :attr:`selects_locally`): a bool keep mask from GEMM-form scores."""
        raise NotImplementedError

    def conforms(self, mask: Tensor) -> bool:
        """Whether a GEMM-form bool mask has this pattern's structure (every group all kept or all pruned)."""
        ids, n = self.group_ids(*mask.shape)
        kept = torch.zeros(n).index_add_(0, ids.reshape(-1), mask.reshape(-1).float())
        sizes = torch.bincount(ids.reshape(-1), minlength=n).float()
        return bool(((kept == 0) | (kept == sizes)).all())

    def __str__(self) -> str:
        return self.name


@register_pattern
@dataclass(frozen=True)
class Unstructured(Pattern):
    syntax: ClassVar[str] = "unstructured"

    @property
    def elementwise(self) -> bool:
        return True

    @property
    def supports_rewiring(self) -> bool:
        return True

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        return torch.arange(rows * cols).view(rows, cols), rows * cols

    def conforms(self, mask: Tensor) -> bool:
        return True


@register_pattern
@dataclass(frozen=True)
class Block(Pattern):
    """``r × c`` tiles; ``Block(r, 1)`` is a column strip inside a row-block, ``Block(1, c)`` a row strip.

    Where the shape doesn't divide, the last row/column of tiles is smaller (edge blocks).
    """

    r: int
    c: int
    syntax: ClassVar[str] = "block:RxC"
    _SPEC: ClassVar[re.Pattern] = re.compile(r"^block:(\d+)(?:x(\d+))?$")

    def __post_init__(self) -> None:
        if self.r < 1 or self.c < 1:
            raise PatternError(f"block sides must be >= 1, got {self.r}x{self.c}")

    @classmethod
    def parse(cls, text: str) -> Block | None:
        """``block:RxC``, or ``block:R`` for square blocks."""
        if match := cls._SPEC.match(text):
            return cls(int(match[1]), int(match[2] or match[1]))
        return None

    @property
    def name(self) -> str:
        return f"block:{self.r}x{self.c}"

    @property
    def supports_rewiring(self) -> bool:
        return True

    @property
    def block_shape(self) -> tuple[int, int]:
        return (self.r, self.c)

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


@register_pattern
@dataclass(frozen=True)
class Channel(Pattern):
    """Whole output rows: neurons of a Linear, filters of a Conv (with their bias)."""

    syntax: ClassVar[str] = "channel"

    @property
    def masks_bias(self) -> bool:
        return True

    def group_ids(self, rows: int, cols: int) -> tuple[Tensor, int]:
        return torch.arange(rows)[:, None].expand(rows, cols), rows


@register_pattern
@dataclass(frozen=True)
class Head(Pattern):
    """Whole attention heads: their query/key/value rows and their output-projection columns.

    Group ids come from the attention module's layout (see ``attention.py``), not from a shape.
    """

    syntax: ClassVar[str] = "head"

    @property
    def masks_bias(self) -> bool:
        return True

    @property
    def scope(self) -> str:
        return "attention"

    def check(self, rows: int, cols: int, layer: str) -> None:
        raise PatternError(
            f"pattern 'head' applies to attention modules only, not to layer '{layer}'"
        )


@register_pattern
@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` nonzeros in every run of ``m`` consecutive inputs (the GEMM columns)."""

    n: int
    m: int
    syntax: ClassVar[str] = "N:M"
    _SPEC: ClassVar[re.Pattern] = re.compile(r"^(\d+):(\d+)$")

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise PatternError(f"N:M needs 1 <= N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> NM | None:
        if match := cls._SPEC.match(text):
            return cls(int(match[1]), int(match[2]))
        return None

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_density(self) -> float:
        return self.n / self.m

    @property
    def selects_locally(self) -> bool:
        return True

    @property
    def allowed_allocations(self) -> tuple[str, ...]:
        return ("uniform",)  # the pattern fixes every layer's density

    @property
    def n_m(self) -> tuple[int, int]:
        return (self.n, self.m)

    def at_density(self, density: float) -> NM | None:
        """n:M with n nearest ``density`` (never below N), as N:M takes no other densities."""
        n = min(self.m, max(self.n, round(self.m * density)))
        return None if n == self.m else NM(n, self.m)

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

    def conforms(self, mask: Tensor) -> bool:
        rows, cols = mask.shape
        return cols % self.m == 0 and bool((mask.reshape(rows, -1, self.m).sum(-1) <= self.n).all())


def pattern_syntaxes() -> list[str]:
    """How every registered pattern is written, for error messages and docs."""
    return [cls.syntax for cls in _REGISTRY]


def parse_pattern(spec: str | Pattern) -> Pattern:
    """``"unstructured"``, ``"block:32x32"`` (or ``"block:32"``), ``"2:4"``, ``"channel"``, ``"head"``,
    or any other registered pattern's syntax."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"pattern must be a string or Pattern, got {spec!r}")
    text = spec.strip().lower()
    for cls in _REGISTRY:
        if (pattern := cls.parse(text)) is not None:
            return pattern
    raise PatternError(f"unknown pattern {spec!r}; expected one of {', '.join(pattern_syntaxes())}")


def block_shape_of(name: str | None) -> tuple[int, int] | None:
    """The ``(r, c)`` blocks a recorded pattern name promises, or None (not a block pattern,
    ``"mixed"``, ``"dense"``, or a name this version does not know)."""
    try:
        return parse_pattern(name).block_shape if name else None
    except PatternError:
        return None
