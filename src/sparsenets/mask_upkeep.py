"""How a mask costs no copy: its weight is kept zero where masked, in place (see :mod:`.masking`).

The forward then returns the stored weight as it is. Three things keep it zero, each noted on
the mask with the identity and version of the tensor it vouches for:

- **the gradient**: a hook zeroes it where masked each time a backward pass accumulates into
  ``.grad`` (which belongs to the tensor alone: autograd copies a gradient it shares);
- **the optimizer**: a step of an optimizer that moves each weight by its own gradient and state
  alone (torch's SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad) leaves a weight zero
  where the weight, its gradient and its state are zero. So before such a step, a weight known
  zero whose gradient is still as masked has its optimizer state zeroed where masked (once per
  mask and optimizer), and after the step it is known zero again, with nothing read;
- **a check**: a forward that finds its weight not known zero (another optimizer, a load, any
  write, a gradient changed after masking) reads it once and zeroes what is not.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .kernels.cpu import masking as kernels

# Optimizers (exact classes) whose update of a weight is zero where its gradient and state are zero.
ELEMENTWISE_OPTIMIZERS = frozenset({torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam,
                                    torch.optim.RAdam, torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad})


@dataclass
class Known:
    """What a mask knows of its weight, as (identity, version) keys of the tensors it checked."""

    zero: tuple[int, int, int] | None = None  # the weight (id, version, address), zero where masked
    gradient: tuple[int, int] | None = None  # its gradient (id, version), just masked
    state: tuple[int, int] | None = None  # (optimizer id, mask version): that optimizer's state zeroed


def applies(tensor: Tensor, mask: Tensor) -> bool:
    """Whether ``tensor`` can be kept zero where masked and returned as it is: a plain leaf
    parameter, whole (not an FSDP shard), outside torch.compile (which fuses the product anyway)."""
    return (type(tensor) is nn.Parameter and tensor.is_leaf and tensor._base is None
            and tensor.shape == mask.shape and tensor.device == mask.device and tensor.is_floating_point()
            and not torch.compiler.is_compiling())


def _key(tensor: Tensor) -> tuple[int, int, int]:
    return id(tensor), tensor._version, tensor.data_ptr()


def keep_zero(tensor: Tensor, mask: Any) -> None:
    """Before a forward that returns ``tensor`` as it is: make sure it is zero where ``mask`` is off."""
    if mask.known.zero != _key(tensor):
        with torch.no_grad():
            kernels.zero_dropped_(tensor, mask.mask)
        mask.known.zero = _key(tensor)
    _hook_gradients(tensor, mask)
    _hook_optimizers()


# ---- the gradient ------------------------------------------------------------------------------

# Each mask's gradient hook: (tensor, handle), by mask; and the mask of each hooked tensor, by id.
_HOOKS: weakref.WeakKeyDictionary[Any, tuple[weakref.ref, Any]] = weakref.WeakKeyDictionary()
_MASK_OF: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _hooked(mask: Any, tensor: Tensor) -> bool:
    hooked = _HOOKS.get(mask)
    return hooked is not None and hooked[0]() is tensor


def _hook_gradients(tensor: Tensor, mask: Any) -> None:
    """Mask ``tensor.grad`` in place whenever a backward pass accumulates into it (hooked once per
    tensor: copies and unpickled models have new tensors, hooked on their first forward)."""
    if not tensor.requires_grad or _hooked(mask, tensor):
        return  # a frozen tensor is hooked when it is trained again
    release(mask)
    handle = tensor.register_post_accumulate_grad_hook(functools.partial(_mask_gradient, weakref.ref(mask)))
    _HOOKS[mask] = (weakref.ref(tensor), handle)
    _MASK_OF[id(tensor)] = mask


def _mask_gradient(mask_ref: weakref.ref, tensor: Tensor) -> None:
    mask, grad = mask_ref(), tensor.grad
    if mask is not None and grad is not None and not grad.is_sparse:
        kernels.mask_(grad, mask.mask)
        mask.known.gradient = (id(grad), grad._version)


def release(mask: Any) -> None:
    """Remove ``mask``'s gradient hook (before its parametrization is removed)."""
    hooked = _HOOKS.pop(mask, None)
    if hooked is not None:
        hooked[1].remove()
        tensor = hooked[0]()
        if tensor is not None and _MASK_OF.get(id(tensor)) is mask:
            del _MASK_OF[id(tensor)]


# ---- the optimizer -----------------------------------------------------------------------------

# The weights each optimizer's current step keeps zero where masked: (tensor, mask) pairs.
_STEPPING: weakref.WeakKeyDictionary[Any, list[tuple[Tensor, Any]]] = weakref.WeakKeyDictionary()


@functools.cache
def _hook_optimizers() -> None:
    """Watch every optimizer's steps (torch's global hooks, installed once)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(_before_step)
    register_optimizer_step_post_hook(_after_step)


def _masked_weights(optimizer: Any) -> list[tuple[Tensor, Any]]:
    found = []
    for group in optimizer.param_groups:
        for tensor in group["params"]:
            mask = _MASK_OF.get(id(tensor))
            if mask is not None and _hooked(mask, tensor):
                found.append((tensor, mask))
    return found


def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS or not _MASK_OF:
        return
    stepping = []
    for tensor, mask in _masked_weights(optimizer):
        grad = tensor.grad
        if grad is None:
            continue  # the step leaves this weight and its state alone
        if mask.known.zero != _key(tensor) or mask.known.gradient != (id(grad), grad._version):
            mask.known.state = None  # a gradient changed after masking may leave state where masked
            continue  # and the forward's check will see to the weight
        state = optimizer.state.get(tensor)
        if state and mask.known.state != (id(optimizer), mask.mask._version):
            for value in state.values():  # momentum left over from before a prune would move the weight
                if isinstance(value, Tensor) and value.shape == tensor.shape:
                    kernels.mask_(value, mask.mask)
        stepping.append((tensor, mask))
    _STEPPING[optimizer] = stepping


def _after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for tensor, mask in _STEPPING.pop(optimizer, ()):
        mask.known.zero = _key(tensor)
        mask.known.state = (id(optimizer), mask.mask._version)  # state made in this step came from masked gradients
