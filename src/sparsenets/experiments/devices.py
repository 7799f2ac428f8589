"""Where and in what precision the experiments train: ``device`` and ``precision`` of a train section.

- ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first CUDA device if there is one,
  else the CPU). It says where a run computes, not what it computes, so it is not part of the
  recipe a run directory keeps (see :meth:`~sparsenets.experiments.recipe.Recipe.to_dict`).
- ``precision``: ``float32``, or ``bfloat16``/``float16`` autocast around the forward pass and
  the loss (weights and optimizer state stay float32). ``float16`` needs CUDA, where gradients
  are scaled against underflow; the CPU has bfloat16.
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal

import torch

from ..errors import ConfigError

DEVICE = re.compile(r"cpu|cuda|cuda:\d{1,3}|auto")
Precision = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device_name(value: str) -> str:
    """A device name's syntax (not whether this machine has it: a recipe is valid everywhere)."""
    if not DEVICE.fullmatch(value):
        raise ValueError("must be cpu, cuda, cuda:N or auto")
    return value


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means on this machine; :class:`ConfigError` naming it when it isn't there."""
    if not DEVICE.fullmatch(name):
        raise ConfigError(f"device {name!r} is not one of cpu, cuda, cuda:N, auto")
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        raise ConfigError(f"device {name!r} is not available: this machine has {have}")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "float16" and device.type != "cuda":
        raise ConfigError(f"precision 'float16' needs a CUDA device (device is {str(device)!r}); "
                          f"use bfloat16 on the CPU")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` (nothing for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for float16 (a no-op scaler otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")
