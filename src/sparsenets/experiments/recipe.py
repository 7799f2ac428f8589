"""Recipes: one YAML file says everything about an experiment; it is checked before anything runs.

::

    name: lth_mnist1d
    seeds: [0, 1, 2]
    data: {name: mnist1d}
    model: {name: lenet_300_100}
    train: {optimizer: adam, lr: 0.0012, epochs: 30}
    method: {name: lottery, prune_fraction: 0.2}
    sparsity: {sparsity: 0.94, allocation: global}

Every section is validated strictly (see :mod:`.schema`): no ``"1"`` for an int, no bool for a
number, no NaN or infinity, ranges, unknown keys named with the valid ones. Every problem is
collected and reported at once, as one :class:`RecipeError` with one ``section.key: message``
line each. The method's protocol declares which of ``data``, ``model``, ``train`` and
``sparsity`` it uses; the others may be left out (and are refused if given).
:meth:`Recipe.to_dict` gives the resolved recipe, every default filled in, which a run
directory keeps so that a rerun can tell whether it is the same experiment; ``train.device``
is left out of it (a run started on one device may resume on another), and so is
``train.precision`` when it is the default float32 (any other precision is part of the experiment).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field

from ..config import SparsityConfig
from ..errors import ConfigError, RecipeError
from ..models import MODELS
from ..registry import Registry
from .data import DATASETS
from .protocols import ALL_SECTIONS, PROTOCOLS, Protocol
from .schema import NonNegativeInt, Section, check, options_schema
from .trainer import TrainConfig, TrainSchema

SECTIONS = ("name", "description", "seeds", "threads", "data", "model", "train", "method", "sparsity")
MAX_THREADS = 256  # a fixed cap, not this machine's CPU count, so a recipe is valid on every machine
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_EXAMPLES = {"data": "{name: mnist1d}", "model": "{name: lenet_300_100}", "method": "{name: lottery}"}


def _name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError("must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' "
                         "(it names the run directory runs/<name>)")
    return value


def _threads(value: int) -> int:
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"must be an integer in 1..{MAX_THREADS}")
    return value


def _distinct(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct")
    return seeds


class Header(Section):
    """The top level of a recipe: its scalar keys, and the sections (checked on their own)."""

    name: Annotated[str, AfterValidator(_name)] = "experiment"
    description: str = ""
    seeds: Annotated[list[NonNegativeInt], Field(min_length=1), AfterValidator(_distinct)] = [0]
    threads: Annotated[int, AfterValidator(_threads)] = 1
    data: Any = None
    model: Any = None
    train: Any = None
    method: Any = None
    sparsity: Any = None


@dataclass
class Recipe:
    """A resolved recipe. A section its protocol does not use is None (typed as used, for the protocols that do)."""

    method: dict[str, Any]
    data: dict[str, Any] = None  # type: ignore[assignment]
    model: dict[str, Any] = None  # type: ignore[assignment]
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    name: str = "experiment"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 1

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """The recipe, resolved; a :class:`RecipeError` lists every problem of ``data`` at once."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping of {', '.join(SECTIONS)}; got {type(data).__name__}")
        header, problems = check(Header, data, "")
        if "experiment" in data:  # the strong-ticket recipes of earlier versions
            problems.append(f"experiment: write method: {{name: {data['experiment']}, ...}} instead (the old "
                            f"options: go into the method section; see recipes/{data['experiment']}*.yaml)")
        protocol, options, found = _method(data.get("method"))
        problems += found
        sections = {}
        for section in ALL_SECTIONS:
            sections[section], found = _section(section, data.get(section), protocol)
            problems += found
        if problems:
            raise _error(problems)
        assert isinstance(header, Header) and protocol is not None  # no problems: both were checked
        recipe = cls(method={}, name=header.name, description=header.description, seeds=header.seeds,
                     threads=header.threads, **sections)
        try:
            options.resolve(recipe)
        except (ConfigError, ValueError) as err:
            raise _error([f"method: {err}"]) from None
        recipe.method = {"name": protocol.name, **options.model_dump()}
        return recipe

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.method["name"]]

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "description": self.description, "seeds": self.seeds, "threads": self.threads}
        for key, value in (("data", self.data), ("model", self.model), ("train", self.train),
                           ("method", self.method), ("sparsity", self.sparsity)):
            if value is not None:
                out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        out = _plain(out)  # copies: the recipe's own sections stay whole
        for section in [out.get("train"), *out["method"].values()]:  # the method's own train sections too
            if isinstance(section, dict) and {"device", "precision"} <= section.keys():
                _drop_run_options(section)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def options(self, section: str) -> dict[str, Any]:
        """A named section's options without its name: ``recipe.options("model")``."""
        return {k: v for k, v in getattr(self, section).items() if k != "name"}


def _drop_run_options(train: dict[str, Any]) -> None:
    """Leave out of a train section what doesn't change the experiment: the device (a run may
    resume on another), and the default precision (so run directories from before it match)."""
    del train["device"]
    if train["precision"] == "float32":
        del train["precision"]


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
        data = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where} is not valid YAML: {_yaml_problem(err)}") from None
    try:
        return Recipe.from_dict(data)
    except RecipeError as err:
        raise _error(getattr(err, "problems", [str(err)]), where) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The problem and where, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


class NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: ``*name`` could expand a few lines into gigabytes (billion laughs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "recipes may not use YAML aliases (*name); "
                                              "write the value out", mark)
        return super().compose_node(parent, index)


def _error(problems: list[str], where: str = "") -> RecipeError:
    """One error for all problems: one line each, ``section.key: message``."""
    prefix = f"{where}: " if where else ""
    if len(problems) == 1:
        error = RecipeError(prefix + problems[0])
    else:
        error = RecipeError(f"{prefix}{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    error.problems = problems  # type: ignore[attr-defined]  # each problem, for programs
    return error


def _method(value: Any) -> tuple[Protocol | None, Any, list[str]]:
    """The protocol a method section names and its checked options, or the problems."""
    value = {"name": value} if isinstance(value, str) else value
    if value is None:
        return None, None, [f"method: required, e.g. {_EXAMPLES['method']}; one of {', '.join(sorted(PROTOCOLS))}"]
    name, problems = _named_name(value, "method", "method", sorted(PROTOCOLS))
    if name is None:
        return None, None, problems
    protocol = PROTOCOLS[name]
    options, problems = check(protocol.Options, _without_name(value), "method", leading=("name",))
    return protocol, options, problems


def _section(section: str, value: Any, protocol: Protocol | None) -> tuple[Any, list[str]]:
    """One of data, model, train, sparsity: checked if the protocol uses it, refused if it doesn't."""
    if protocol is not None and section not in protocol.sections:
        if value is not None:
            return None, [f"{section}: method {protocol.name!r} uses no {section} section; remove it"]
        return None, []
    if section == "train":
        checked, problems = check(TrainSchema, value, "train")
        return (TrainConfig(**checked.model_dump()) if checked else None), problems
    if section == "sparsity":
        return _sparsity(value)
    if value is None:
        if protocol is None:  # the method is wrong already; don't pile on
            return None, []
        return None, [f"{section}: required by method {protocol.name!r}, e.g. {_EXAMPLES[section]}"]
    registry = DATASETS if section == "data" else MODELS
    return _named(section, value, registry)


def _sparsity(value: Any) -> tuple[SparsityConfig | None, list[str]]:
    if value is not None and not isinstance(value, dict):
        return None, [f"sparsity: must be a mapping, got {value!r}"]
    try:
        return SparsityConfig.from_dict(dict(value or {})), []
    except (ConfigError, ValueError, TypeError) as err:
        return None, [f"sparsity: {err}"]


def _named(section: str, value: Any, registry: Registry) -> tuple[dict[str, Any] | None, list[str]]:
    """A ``{name: ..., **options}`` section, with the options checked against the factory's signature."""
    value = {"name": value} if isinstance(value, str) else value
    name, problems = _named_name(value, section, registry.kind, registry.names())
    if name is None:
        return None, problems
    schema = options_schema(registry.factory(name), registry.fixed, f"{section} {name}")
    options, problems = check(schema, _without_name(value), section, leading=("name",))
    if options is None:
        return None, problems
    return {"name": name, **options.model_dump()}, problems


def _named_name(value: Any, section: str, kind: str, names: list[str]) -> tuple[str | None, list[str]]:
    """The name a section gives, or None and the problems."""
    if not isinstance(value, dict):
        return None, [f"{section}: must be a mapping with a name, e.g. {_EXAMPLES[section]}; got {value!r}"]
    name = value.get("name")
    if "name" not in value:
        return None, [f"{section}.name: required; one of {', '.join(names)}"]
    if not isinstance(name, str) or name not in names:
        return None, [f"{section}.name: unknown {kind} {name!r}; choose from {', '.join(names)}"]
    return name, []


def _without_name(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "name"}


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
