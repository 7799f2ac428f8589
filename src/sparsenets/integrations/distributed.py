"""Collectives that keep sparsity decisions identical on every rank of a process group.

The methods call these wherever a decision depends on rank-local state (each rank's data, its
dense gradient, its initial weights). With no process group running, or one of a single rank,
every function here does nothing, so single-process training pays nothing.

Under a process group these calls are collective: every rank must reach them in the same
order, which holds when every rank runs the same training loop (as DDP and FSDP require).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def active() -> bool:
    """True when a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over all ranks, in place (scores and gradients from every rank's data)."""
    if active():
        for tensor in tensors:
            _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place.

    Used on decisions already made identically on every rank, as a guard: floating-point ties
    broken differently would otherwise leave ranks with different masks.
    """
    if active():
        for tensor in tensors:
            _collective(tensor, lambda t: dist.broadcast(t, src=src))


def _collective(tensor: Tensor, op: Callable[[Tensor], object]) -> None:
    # gloo has no bool collectives, and collectives need contiguous memory
    carrier = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    op(carrier)
    if carrier is not tensor:
        tensor.copy_(carrier)


# ---- sharded parameters (FSDP's DTensors) -----------------------------------------------------------


def _dtensors() -> Any:
    """``torch.distributed.tensor`` if something (FSDP) imported it, else None: without it no DTensor
    exists, and importing it costs seconds that unsharded training shouldn't pay."""
    return sys.modules.get("torch.distributed.tensor")


def _is_sharded(tensor: Tensor) -> bool:
    dtensors = _dtensors()
    return dtensors is not None and isinstance(tensor, dtensors.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds sharded parameters (it was passed to ``fully_shard``)."""
    return any(_is_sharded(p) for p in model.parameters())


def like(full: Tensor, reference: Tensor) -> Tensor:
    """``full`` (a whole mask) laid out as ``reference``: sliced to this rank's shard when
    ``reference`` is a DTensor (FSDP), so it multiplies and fills the sharded parameter in place."""
    if not _is_sharded(reference):
        return full
    mesh, placements = reference.device_mesh, reference.placements  # type: ignore[attr-defined]
    return _dtensors().distribute_tensor(full.to(reference.device), mesh, placements, src_data_rank=None)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: a sharded parameter gathered from every rank (collective), else ``tensor``."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor  # type: ignore[attr-defined]
