"""The errors sparsenets raises on bad input; catch :class:`SparsenetsError` for all of them.

Each is also a ``ValueError`` (a bad value was given), so code written against the older,
plain ``ValueError`` keeps working. Messages name the bad key, value, file or layer.
"""

from __future__ import annotations


class SparsenetsError(ValueError):
    """Base class of every error sparsenets raises on bad input."""


class ConfigError(SparsenetsError):
    """A config value or key that is not valid; the message names it."""


class PatternError(ConfigError):
    """A pattern that a layer cannot take, or a pattern string that does not parse."""


class CheckpointError(SparsenetsError):
    """A checkpoint that can't be read or rebuilt; the message names the file and the problem."""


class RunDirError(SparsenetsError):
    """A run directory that can't be used (another recipe's, locked, unwritable, damaged)."""


class RecipeError(ConfigError):
    """A recipe that can't run; the message names the key and the value."""


__all__ = ["CheckpointError", "ConfigError", "PatternError", "RecipeError", "RunDirError", "SparsenetsError"]
