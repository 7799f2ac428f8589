"""Strict validation of recipe sections with pydantic, and problems worded as ``section.key: message``.

Every section is a pydantic model with :data:`STRICT`: no ``"1"`` for an int, no bool for a
number, no NaN or infinity, no unknown keys. :func:`check` turns a section into its model
instance or a list of problems, so a recipe can report every problem at once.
"""

from __future__ import annotations

import inspect
import typing
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # a sparsity, density or probability strictly inside (0, 1)
Sparsity = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """Base of every strict recipe section."""

    model_config = STRICT


def check(schema: type[BaseModel], value: Any, where: str,
          leading: tuple[str, ...] = ()) -> tuple[BaseModel | None, list[str]]:
    """``schema`` validated from ``value`` (a mapping, or None for all defaults), or the problems.

    ``leading``: keys the caller took out of ``value`` (a section's ``name``), listed among the valid ones.
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None, [f"{where}: must be a mapping, got {value!r}"]
    try:
        return schema.model_validate(value), []
    except ValidationError as err:
        return None, describe(err, schema, where, leading)


def describe(err: ValidationError, schema: type[BaseModel], where: str, leading: tuple[str, ...] = ()) -> list[str]:
    """One line per problem; unknown keys of one mapping are named together with the valid ones."""
    problems: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for error in err.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        message = error["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        if error["type"] == "missing":
            problems.append(f"{path(where, loc)}: required")
        else:
            problems.append(f"{path(where, loc)}: {message}, got {error['input']!r}")
    for loc, keys in unknown.items():
        valid = ", ".join([*(leading if not loc else ()), *_fields_at(schema, loc)])
        problems.append(f"{path(where, loc)}: unknown key(s) {sorted(keys)}; valid keys: {valid}")
    return problems


def path(where: str, loc: tuple) -> str:
    """``method.algorithms[0]`` from ``where="method"`` and ``loc=("algorithms", 0)``."""
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = schema.model_fields[part].annotation
        nested = [a for a in (annotation, *typing.get_args(annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        schema = nested[0]
    return list(schema.model_fields)


@cache
def options_schema(factory: Any, fixed: tuple[str, ...], title: str) -> type[BaseModel]:
    """A strict section model from a factory's signature: its annotations (with ``Field`` ranges) and defaults."""
    hints = _hints(factory)
    fields: dict[str, Any] = {}  # name → (annotation, default)
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.name in fixed or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (hints.get(parameter.name, Any), default)
    return create_model(title, __base__=Section, **fields)


def _hints(factory: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(factory, include_extras=True)
    except (NameError, TypeError):  # an annotation that does not resolve: accept any value there
        return {}
