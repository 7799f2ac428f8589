"""Recipes: one YAML file says everything about an experiment; it is checked before anything runs.

::

    name: lth_mnist1d
    seeds: [0, 1, 2]
    data: {name: mnist1d}
    model: {name: lenet_300_100}
    train: {optimizer: adam, lr: 0.0012, epochs: 30}
    method: {name: lottery, prune_fraction: 0.2}
    sparsity: {sparsity: 0.94, allocation: global}

Unknown keys are errors that list the valid ones; bad values are errors that name them.
:meth:`Recipe.to_dict` gives the resolved recipe, every default filled in, which a run
directory keeps so that a rerun can tell whether it is the same experiment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import SparsityConfig
from ..errors import ConfigError, RecipeError
from .data import DATASETS
from ..models import MODELS
from .protocols import PROTOCOLS, check_options, validate
from .trainer import TrainConfig

SECTIONS = ("name", "description", "seeds", "threads", "data", "model", "train", "method", "sparsity")



@dataclass
class Recipe:
    data: dict[str, Any]
    model: dict[str, Any]
    method: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    name: str = "experiment"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 1

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping of {', '.join(SECTIONS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise RecipeError(f"unknown key(s) {unknown}; valid keys: {', '.join(SECTIONS)}")
        for section in ("data", "model", "method"):
            if section not in data:
                raise RecipeError(f"the recipe needs a '{section}' section, e.g. {_EXAMPLES[section]}")
        recipe = cls(
            data=_named(data["data"], "data", DATASETS.names(), DATASETS.check),
            model=_named(data["model"], "model", MODELS.names(), MODELS.check),
            method=_named(data["method"], "method", sorted(PROTOCOLS), check_options),
            train=_section("train", lambda: TrainConfig.from_dict(_mapping(data.get("train", {}), "train"))),
            sparsity=_section("sparsity", lambda: SparsityConfig.from_dict(_mapping(data.get("sparsity", {}), "sparsity"))),
            name=str(data.get("name", "experiment")),
            description=str(data.get("description", "")),
            seeds=_seeds(data.get("seeds", [0])),
            threads=_positive_int(data.get("threads", 1), "threads"),
        )
        _section("method", lambda: validate(recipe))
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return _plain({
            "name": self.name, "description": self.description, "seeds": self.seeds, "threads": self.threads,
            "data": self.data, "model": self.model, "train": self.train.to_dict(),
            "method": self.method, "sparsity": self.sparsity.to_dict(),
        })

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def options(self, section: str) -> dict[str, Any]:
        """A named section's options without its name: ``recipe.options("model")``."""
        return {k: v for k, v in getattr(self, section).items() if k != "name"}


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """A :class:`Recipe` from a YAML file, a YAML string or a dict."""
    if isinstance(source, dict):
        return Recipe.from_dict(source)
    text, where = str(source), "recipe"
    if os.path.exists(text):
        where = text
        with open(text) as handle:
            text = handle.read()
    elif text.endswith((".yaml", ".yml")) and "\n" not in text:
        raise RecipeError(f"recipe file {text!r} does not exist")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where} is not valid YAML: {err}") from None
    try:
        return Recipe.from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None


_EXAMPLES = {"data": "{name: mnist1d}", "model": "{name: lenet_300_100}", "method": "{name: lottery}"}


def _mapping(value: Any, section: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{section} must be a mapping, got {value!r}")
    return dict(value)


def _section(section: str, make: Any) -> Any:
    try:
        return make()
    except RecipeError:
        raise
    except (ConfigError, ValueError, TypeError) as err:
        raise RecipeError(f"{section}: {err}") from None


def _named(value: Any, section: str, names: list[str], check: Any) -> dict[str, Any]:
    """A ``{name: ..., **options}`` section, with the options checked and defaults filled in."""
    value = {"name": value} if isinstance(value, str) else _mapping(value, section)
    if "name" not in value:
        raise RecipeError(f"{section} needs a 'name': one of {', '.join(names)}")
    name = value.pop("name")
    if name not in names:
        raise RecipeError(f"unknown {section} {name!r}; choose from {', '.join(names)}")
    return {"name": name, **_section(section, lambda: check(name, value))}


def _seeds(value: Any) -> list[int]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise RecipeError(f"seeds must be a non-empty list of integers >= 0, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise RecipeError(f"seeds must be distinct, got {value!r}")
    return list(seeds)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """Lists for tuples, plain dicts: what YAML writes and reads back unchanged."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if value is not None and not isinstance(value, (bool, int, float, str)):
        return str(value)
    return value
