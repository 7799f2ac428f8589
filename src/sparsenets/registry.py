"""Name → factory tables for data sets and models, with option checking from the signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .errors import ConfigError


class Registry:
    """Factories by name. ``build(name, **options)`` rejects unknown names and options by name."""

    def __init__(self, kind: str, fixed: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.fixed = fixed  # arguments the caller supplies, not the user (e.g. input_shape)
        self.factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable:
        def add(factory: Callable) -> Callable:
            self.factories[name] = factory
            return factory
        return add

    def names(self) -> list[str]:
        return sorted(self.factories)

    def options(self, name: str) -> dict[str, Any]:
        """The options a factory takes, with their defaults."""
        parameters = inspect.signature(self.factory(name)).parameters.values()
        return {p.name: p.default for p in parameters if p.name not in self.fixed}

    def factory(self, name: str) -> Callable[..., Any]:
        if name not in self.factories:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self.factories[name]

    def check(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; raises :class:`ConfigError` on an unknown option."""
        valid = self.options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for {self.kind} {name!r}; "
                              f"valid options: {', '.join(['name', *valid])}")
        missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in options]
        if missing:
            raise ConfigError(f"{self.kind} {name!r} needs option(s) {missing}")
        return {**valid, **options}

    def build(self, name: str, *fixed: Any, **options: Any) -> Any:
        return self.factory(name)(*fixed, **self.check(name, options))
