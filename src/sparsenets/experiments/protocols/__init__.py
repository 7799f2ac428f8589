"""Protocols: which networks an experiment trains, one module per ``method:`` of a recipe.

Every module of this package is imported here, so a protocol registered in a new file (see
:mod:`.base`) is available to recipes without touching any other file. Each job trains on
the same data order (a function of the seed), so arms and levels differ only in what they
are meant to differ in.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    ALL_SECTIONS,
    ARMS,
    DENSE,
    PROTOCOLS,
    Arm,
    Context,
    Job,
    Options,
    Outcome,
    Protocol,
    arm,
    init_seed,
    register_protocol,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str) -> type[Protocol]:
    """Protocol classes by class name (``protocols.LotteryProtocol``), wherever they are defined."""
    for protocol in PROTOCOLS.values():
        if type(protocol).__name__ == name:
            return type(protocol)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALL_SECTIONS", "ARMS", "DENSE", "PROTOCOLS", "Arm", "Context", "Job", "Options", "Outcome", "Protocol",
           "arm", "init_seed", "register_protocol"]
