"""``SparsityConfig``: what to sparsify, how much, and by which rule; validated on creation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .allocation import ALLOCATIONS
from .criteria import CRITERIA
from .errors import ConfigError
from .patterns import Pattern, parse_pattern
from .targets import MODULE_TYPES, name_matches


def _check_sparsity(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass
class SparsityConfig:
    """How to sparsify a model.

    Args:
        sparsity: fraction of weights to remove, in [0, 1). Defaults to the pattern's own
            density for N:M (1 - N/M) and to 0.5 otherwise.
        pattern: ``"unstructured"``, ``"block:RxC"``, ``"N:M"``, ``"channel"``, ``"head"`` (any
            registered pattern, :func:`~sparsenets.patterns.register_pattern`) or a Pattern.
        criterion: ``magnitude``, ``random``, ``snip``, ``grasp``, ``synflow``, ``taylor``, ``wanda``
            (any registered criterion, :func:`~sparsenets.criteria.criterion`).
        allocation: ``uniform`` (same sparsity in every layer), ``global`` (one score threshold
            over all layers) or ``erk`` (Erdős–Rényi-kernel densities); any registered allocation.
        include / exclude: globs on module names; a glob also covers a module's children.
        module_types: layer classes to sparsify (default: Linear, Conv1d/2d/3d, HF Conv1D,
            MultiheadAttention, LSTM, GRU, RNN; add ``"Embedding"`` to prune embeddings).
        keep_first_last_dense: leave the first and last selected layers (registration order) dense.
        overrides: ``{glob: sparsity}`` or ``{glob: {"sparsity": s, "pattern": p}}``; the first
            matching glob wins; sparsity 0 keeps a layer dense. Overridden layers are fixed and
            the allocation shares ``sparsity`` among the others.
        rounds: prune iteratively over this many rounds on an exponential schedule (default:
            the criterion's own, 100 for synflow, 1 otherwise).
        batches: how many batches of ``data`` data-driven criteria use (default: all).
        input_shape: per-sample input shape for synflow when no data is given.
        seed: seeds random scores and everything random in scoring.
    """

    sparsity: float | None = None
    pattern: str | Pattern = "unstructured"
    criterion: str = "magnitude"
    allocation: str = "uniform"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    module_types: list[str] | None = None
    keep_first_last_dense: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    rounds: int | None = None
    batches: int | None = None
    input_shape: list[int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            self.pattern = parse_pattern(self.pattern)
        except ValueError as err:
            raise ConfigError(f"pattern: {err}") from None
        fixed = self.pattern.fixed_density
        if self.sparsity is None:
            self.sparsity = 1.0 - fixed if fixed is not None else 0.5
        self.sparsity = _check_sparsity(self.sparsity, "sparsity")
        if fixed is not None and abs(self.sparsity - (1.0 - fixed)) > 1e-9:
            raise ConfigError(f"pattern {self.pattern} fixes sparsity at {1 - fixed:g}, "
                              f"but sparsity={self.sparsity:g} was given")
        self.criterion = self._choice("criterion", self.criterion, tuple(CRITERIA))
        self.allocation = self._choice("allocation", self.allocation, tuple(ALLOCATIONS))
        allowed = self.pattern.allowed_allocations
        if allowed is not None and self.allocation not in allowed:
            raise ConfigError(f"pattern {self.pattern} does not take allocation {self.allocation!r}; "
                              f"use {' or '.join(map(repr, allowed))}")
        for key in ("include", "exclude", "module_types"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
        if self.include is not None and not self.include:
            raise ConfigError("include is an empty list; leave it out to include every layer")
        for name in self.module_types or []:
            if name not in MODULE_TYPES:
                raise ConfigError(f"module_types: unknown type {name!r}; supported: {', '.join(MODULE_TYPES)}")
        self.overrides = {glob: self._override(glob, value, self.pattern)
                          for glob, value in dict(self.overrides).items()}
        if self.rounds is None:
            self.rounds = CRITERIA[self.criterion].default_rounds
        for key in ("rounds", "batches"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.input_shape is not None:
            self.input_shape = [int(d) for d in self.input_shape]

    @staticmethod
    def _choice(key: str, value: Any, options: tuple[str, ...]) -> str:
        text = str(value).lower()
        if text not in options:
            raise ConfigError(f"unknown {key} {value!r}; choose from {', '.join(options)}")
        return text

    def _override(self, glob: str, value: Any, base: Pattern) -> dict[str, Any]:
        """An override, validated; ``base`` is the config's own (parsed) pattern."""
        where = f"overrides[{glob!r}]"
        if not isinstance(value, dict):
            value = {"sparsity": value}
        unknown = set(value) - {"sparsity", "pattern"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use 'sparsity' and/or 'pattern'")
        out: dict[str, Any] = {}
        if "pattern" in value:
            try:
                out["pattern"] = parse_pattern(value["pattern"])
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            if out["pattern"].scope != base.scope:
                raise ConfigError(f"{where}: pattern {out['pattern']} works per {out['pattern'].scope}, "
                                  f"the config's pattern {base} per {base.scope}; an override can't mix them")
        pattern = out.get("pattern", base)
        if "sparsity" in value:
            out["sparsity"] = _check_sparsity(value["sparsity"], f"{where}.sparsity")
        elif pattern.fixed_density is not None:
            out["sparsity"] = 1.0 - pattern.fixed_density
        fixed = pattern.fixed_density
        if fixed is not None and out["sparsity"] != 0.0 and abs(out["sparsity"] - (1 - fixed)) > 1e-9:
            raise ConfigError(f"{where}: pattern {pattern} fixes sparsity at {1 - pattern.fixed_density:g}")
        return out

    # ---- the resolved fields, typed -------------------------------------------------------
    # ``sparsity`` and ``pattern`` also take what users write (None, a pattern string);
    # ``__post_init__`` resolves both, and these give them their resolved types.

    @property
    def target_sparsity(self) -> float:
        """The overall sparsity: as given, or the pattern's default."""
        assert self.sparsity is not None, "resolved in __post_init__"
        return self.sparsity

    @property
    def target_pattern(self) -> Pattern:
        """The pattern, parsed."""
        assert isinstance(self.pattern, Pattern), "parsed in __post_init__"
        return self.pattern

    # ---- per-layer resolution --------------------------------------------------------------

    def _override_for(self, name: str) -> dict[str, Any]:
        return next((v for glob, v in self.overrides.items() if name_matches(name, [glob])), {})

    def pattern_for(self, name: str) -> Pattern | None:
        """The pattern a layer gets, or None when an override keeps it dense."""
        override = self._override_for(name)
        if override.get("sparsity") == 0.0:
            return None
        return override.get("pattern", self.pattern)

    def sparsity_for(self, name: str, pattern: Pattern) -> float | None:
        """A layer's fixed sparsity (override or N:M), or None when the allocation decides."""
        override = self._override_for(name)
        if "sparsity" in override:
            return override["sparsity"]
        return 1.0 - pattern.fixed_density if pattern.fixed_density is not None else None

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a sparsity config must be a mapping, got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> SparsityConfig:
        """From a YAML file path or a YAML string; a path that doesn't exist is a :class:`ConfigError`."""
        text = str(source)
        if os.path.exists(text):
            with open(text) as handle:
                return cls.from_dict(yaml.safe_load(handle.read()))
        if _looks_like_path(source):
            raise ConfigError(f"config file not found: {text!r}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config is neither an existing file nor valid YAML: {err}") from None
        if isinstance(data, str):  # a one-word "YAML document" is a mistyped path far more often
            raise ConfigError(f"config file not found: {text!r}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["pattern"] = str(self.pattern)
        data["overrides"] = {
            glob: {k: str(v) if k == "pattern" else v for k, v in o.items()} for glob, o in self.overrides.items()
        }
        return data


def _looks_like_path(source: str | os.PathLike) -> bool:
    if not isinstance(source, str):
        return True
    return "\n" not in source and source.strip().lower().endswith((".yaml", ".yml", ".json"))


def as_config(config: SparsityConfig | dict | str) -> SparsityConfig:
    if isinstance(config, SparsityConfig):
        return config
    if isinstance(config, dict):
        return SparsityConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return SparsityConfig.from_yaml(config)
    raise ConfigError(f"expected a SparsityConfig, dict or YAML path, got {type(config).__name__}")
