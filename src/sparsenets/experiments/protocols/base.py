"""The protocol interface: jobs, outcomes, arms, options and the registry.

A protocol says which networks an experiment trains, as a list of :class:`Job`; the runner
runs them in order, checkpoints each one and skips those already done, so every protocol is
resumable for free. A protocol declares, in its own file:

- ``Options``: a pydantic model of its ``method:`` section (strict types and ranges), with
  :meth:`Options.resolve` for checks against the rest of the recipe and derived defaults;
- ``arms``: the :class:`Arm` s it trains (name, label, plot colour and line style);
- ``sections``: the recipe sections it reads (``data``, ``model``, ``train``, ``sparsity``);
  the others are refused in its recipes and may be left out;
- ``jobs(recipe)`` and ``run(job, ctx)``; optionally ``check(ctx)``, ``result(...)`` and the
  report hooks ``describe``, ``findings``, ``report_lines``, ``plots`` and ``print_summary``
  (and ``metric``, ``legend``), whose defaults suit accuracy-vs-sparsity experiments.

``@register_protocol("name")`` makes it the recipe's ``method: {name: ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from typing import Protocol as Interface

from torch import nn

from ..schema import Section
from ..trainer import TrainConfig, mix_seed

if TYPE_CHECKING:
    from rich.console import Console

    from ..data import Dataset
    from ..recipe import Recipe

ALL_SECTIONS = ("data", "model", "train", "sparsity")


@dataclass(frozen=True)
class Job:
    seed: int
    arm: str
    level: int = 0
    target: float = 0.0  # nominal sparsity of the level
    parent: str | None = None  # key of the job whose checkpoint this one starts from

    @property
    def key(self) -> str:
        return f"seed{self.seed}-{self.arm}" + (f"-{self.level:02d}" if self.arm != "dense" else "")

    @property
    def parent_key(self) -> str:
        """``parent``, for a job that starts from another's checkpoint (an error for one that doesn't)."""
        if self.parent is None:
            raise ValueError(f"job {self.key} starts from no other job's checkpoint")
        return self.parent


@dataclass
class Outcome:
    model: nn.Module
    history: list[dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)  # saved with the checkpoint (e.g. θ_k)


@dataclass(frozen=True)
class Arm:
    """One kind of network a protocol trains, as tables and plots show it."""

    name: str
    label: str  # in legends and report prose
    short: str = ""  # table column; default: the label
    color: str = "tab:gray"
    sparse: bool = True  # its per-layer densities are worth a plot (not for dense or dropout arms)
    linestyle: str = "-"  # matplotlib's, for lines that tell variants of one method apart

    @property
    def column(self) -> str:
        return self.short or self.label


DENSE = Arm("dense", "dense", color="black", sparse=False)


class Context(Interface):
    """What the runner offers a protocol."""

    recipe: Recipe
    data: Dataset | None
    steps_per_epoch: int

    def new_model(self, init_seed: int) -> nn.Module: ...
    def restore(self, key: str) -> nn.Module: ...
    def extra(self, key: str) -> dict[str, Any]: ...
    def calibration(self, seed: int) -> list: ...
    def train(self, model: nn.Module, job: Job, hooks: Sequence[Any] = ..., start_step: int = 0,
              config: TrainConfig | None = None) -> list[dict[str, float]]: ...
    def result_row(self, job: Job, outcome: Outcome) -> dict[str, Any]: ...


class Options(Section):
    """A protocol's ``method:`` options: strict pydantic fields with defaults."""

    def resolve(self, recipe: Recipe) -> None:
        """Check against the other sections and fill derived defaults, in place; raise ``ConfigError``."""


class Protocol:
    """Base class: override ``jobs`` and ``run``; the rest has defaults for accuracy-vs-sparsity runs."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    arms: ClassVar[tuple[Arm, ...]] = (DENSE,)
    sections: ClassVar[tuple[str, ...]] = ALL_SECTIONS
    metric: ClassVar[tuple[str, str]] = ("test_accuracy", "accuracy")  # result key, summary prefix
    legend: ClassVar[str] = ""  # what the arms are, for report.md

    def jobs(self, recipe: Recipe) -> list[Job]:
        raise NotImplementedError

    def run(self, job: Job, ctx: Context) -> Outcome:
        raise NotImplementedError

    def check(self, ctx: Context) -> None:
        """Checks that need the data or a built model, before anything is written; raise ``ConfigError``."""

    def result(self, job: Job, outcome: Outcome, ctx: Context) -> dict[str, Any]:
        """The numbers of one trained network (a row of results.json)."""
        return ctx.result_row(job, outcome)

    def describe(self, row: dict[str, Any]) -> str:
        """One line of progress for a finished job."""
        return f"{100 * row['remaining']:6.2f}% of weights   test accuracy {100 * row['test_accuracy']:5.1f}%"

    def findings(self, results: dict[str, Any]) -> list[str]:
        """Claims checked on the summary, one sentence each (report.md and the terminal)."""
        return []

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        """report.md's body (markdown lines): tables and findings; plots and the recipe follow."""
        from .. import summary

        return summary.accuracy_report(results, self)

    def plots(self) -> dict[str, Callable[[dict[str, Any], list[dict[str, Any]]], Any]]:
        """File name → maker(results, metrics rows) returning a matplotlib Figure, or None to skip."""
        from .. import plots

        return plots.accuracy_plots(self)

    def print_summary(self, results: dict[str, Any], console: Console) -> None:
        from .. import summary

        summary.print_accuracy(results, console, self)


def init_seed(seed: int) -> int:
    """The seed of θ0 for an experiment seed."""
    return mix_seed(seed, "init")



PROTOCOLS: dict[str, Protocol] = {}
ARMS: dict[str, Arm] = {}  # every protocol's arms, in declaration order (tables and plots sort by it)
P = TypeVar("P", bound=type[Protocol])


def register_protocol(name: str) -> Callable[[P], P]:
    """Class decorator: the protocol becomes ``method: {name: NAME}`` in recipes."""
    def add(cls: P) -> P:
        if name in PROTOCOLS:
            raise ValueError(f"protocol {name!r} is registered twice")
        for arm in cls.arms:
            if ARMS.setdefault(arm.name, arm) != arm:
                raise ValueError(f"protocol {name!r} redefines arm {arm.name!r}; reuse the existing Arm")
        cls.name = name
        PROTOCOLS[name] = cls()
        return cls
    return add


def arm(name: str) -> Arm:
    """A registered arm; an unknown one (from an older run directory) gets a plain look."""
    return ARMS.get(name) or Arm(name, name)
