"""Criteria: a score per weight element; higher means keep.

A criterion is one function registered with :func:`criterion`; ``SparsityConfig`` takes its
choices from :data:`CRITERIA`, so adding one touches this file only. The function is called
as ``score(model, weights, batches, loss_fn, generator, config)`` and returns
``{qualname: scores}``.

Each criterion scores the weights of a private plain copy of the model (masks baked in),
so scoring never changes the user's model: not its weights, ``.grad``, BatchNorm
statistics or RNG state. Scores come back in each weight's own shape, keyed by the
weight's qualified name (``"encoder.0.weight"``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import batches as B
from .errors import ConfigError
from .gemm import is_experts, is_hf_conv1d, to_gemm
from .integrations import distributed

Weights = dict[str, tuple[nn.Module, str]]  # qualname -> (module, param name) in the scored model
Scores = dict[str, Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable[..., Scores] | None  # (model, weights, batches, loss_fn, generator, config) -> Scores
    needs_data: bool = False
    row_wise: bool = False  # compare within each output row (Wanda) when a layer has its own target
    default_rounds: int = 1  # pruning rounds when the config doesn't say
    # what layer-by-layer pruning (sparsenets.layerwise) needs of each layer's inputs: "weights"
    # (nothing), "norms" or "gram"; None: the criterion scores the whole model at once
    layer_stats: str | None = None


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, *, needs_data: bool = False, row_wise: bool = False, default_rounds: int = 1,
              layer_stats: str | None = None) -> Callable[[Callable[..., Scores]], Callable[..., Scores]]:
    """Register a score function under ``name`` (what a config's ``criterion`` says)."""
    def register(score: Callable[..., Scores]) -> Callable[..., Scores]:
        CRITERIA[name] = Criterion(name, score, needs_data, row_wise, default_rounds, layer_stats)
        return score
    return register


def _tensor(weights: Weights, key: str) -> Tensor:
    module, param = weights[key]
    return getattr(module, param)


@criterion("magnitude", layer_stats="weights")
def magnitude(model, weights: Weights, *_: Any) -> Scores:
    return {k: _tensor(weights, k).detach().abs() for k in weights}


@criterion("random", layer_stats="weights")
def random(model, weights: Weights, batches, loss_fn, generator: torch.Generator, *_: Any) -> Scores:
    return {k: torch.rand(_tensor(weights, k).shape, generator=generator).to(_tensor(weights, k).device)
            for k in weights}


def _gradients(model: nn.Module, weights: Weights, batch: Any, loss_fn,
               create_graph: bool = False) -> list[Tensor | None]:
    params = [_tensor(weights, k) for k in weights]
    loss = B.loss(model, batch, loss_fn)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def _zeros_for_unused(grads: Sequence[Tensor | None], weights: Weights) -> list[Tensor]:
    return [torch.zeros_like(_tensor(weights, k)) if g is None else g for g, k in zip(grads, weights)]


@criterion("snip", needs_data=True)
def snip(model, weights: Weights, batches, loss_fn, *_: Any) -> Scores:
    """Connection sensitivity |w ⊙ g| (Lee et al. 2019), gradients summed over the batches."""
    total = [torch.zeros_like(_tensor(weights, k)) for k in weights]
    for batch in batches:
        for acc, g in zip(total, _zeros_for_unused(_gradients(model, weights, batch, loss_fn), weights)):
            acc += g.detach()
    distributed.all_reduce_sum_(total)  # the gradient over every rank's batches
    return {k: (_tensor(weights, k).detach() * g).abs() for k, g in zip(weights, total)}


@criterion("taylor", needs_data=True)
def taylor(model, weights: Weights, batches, loss_fn, *_: Any) -> Scores:
    """First-order Taylor importance, |w ⊙ g| accumulated batch by batch."""
    total = {k: torch.zeros_like(_tensor(weights, k)) for k in weights}
    for batch in batches:
        grads = _zeros_for_unused(_gradients(model, weights, batch, loss_fn), weights)
        for k, g in zip(weights, grads):
            total[k] += (_tensor(weights, k).detach() * g.detach()).abs()
    distributed.all_reduce_sum_(total.values())
    return total


@criterion("grasp", needs_data=True)
def grasp(model, weights: Weights, batches, loss_fn, *_: Any) -> Scores:
    """GraSP (Wang et al. 2020). The paper removes the largest −w ⊙ Hg, so we keep the largest w ⊙ Hg."""
    g = [torch.zeros_like(_tensor(weights, k)) for k in weights]
    for batch in batches:
        for acc, grad in zip(g, _zeros_for_unused(_gradients(model, weights, batch, loss_fn), weights)):
            acc += grad.detach()
    distributed.all_reduce_sum_(g)  # Hg needs the gradient of the whole (all ranks') loss
    hg = [torch.zeros_like(x) for x in g]
    params = [_tensor(weights, k) for k in weights]
    for batch in batches:
        # fused attention kernels have no double backward; the math kernel does
        with sdpa_kernel(SDPBackend.MATH):
            grads = _gradients(model, weights, batch, loss_fn, create_graph=True)
        z = cast(Tensor, sum((gr * gi).sum() for gr, gi in zip(grads, g) if gr is not None))
        for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
            if h is not None:
                acc += h.detach()
    distributed.all_reduce_sum_(hg)
    return {k: _tensor(weights, k).detach() * h for k, h in zip(weights, hg)}


def _synflow_input(batches: list, config) -> Any:
    if config.input_shape is not None:
        return torch.ones(1, *config.input_shape)
    if not batches:
        raise ConfigError("criterion 'synflow' needs the input shape: pass data (one batch is "
                         "enough) or set input_shape in the config")

    def ones(x: Any) -> Any:
        if isinstance(x, Tensor):
            return torch.ones_like(x[:1]) if x.is_floating_point() else x[:1]
        return x

    batch = batches[0]
    if isinstance(batch, dict):
        return {k: ones(v) for k, v in batch.items()}
    return ones(batch[0] if isinstance(batch, (list, tuple)) else batch)


@criterion("synflow", default_rounds=100)
def synflow(model, weights: Weights, batches, loss_fn, generator, config) -> Scores:
    """SynFlow (Tanaka et al. 2020): data-free synaptic flow |w ⊙ ∂R/∂w| with R = sum f_|θ|(1).

    The flow runs in float64, where products of many |w| stay finite; a model with an op that has
    no float64 kernel (grouped expert matmuls) runs in float32 instead, which suits shallow models.
    """
    try:
        return _synflow(model, weights, batches, config, torch.float64)
    except RuntimeError as error:
        warnings.warn(f"criterion 'synflow' scores in float32: this model has no float64 kernel for an op "
                      f"({str(error).splitlines()[0][:120]})", stacklevel=2)
        return _synflow(model, weights, batches, config, torch.float32)


def _synflow(model, weights: Weights, batches, config, dtype: torch.dtype) -> Scores:
    names = {id(m): n for n, m in model.named_modules()}
    flow = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad():
        for tensor in list(flow.parameters()) + list(flow.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    flow_weights = {k: (flow.get_submodule(names[id(m)]), p) for k, (m, p) in weights.items()}
    device = next(flow.parameters()).device
    x = B.to_device(_synflow_input(batches, config), device)
    if isinstance(x, Tensor) and x.is_floating_point():
        x = x.to(dtype)
    elif isinstance(x, dict):
        x = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in x.items()}
    params = [_tensor(flow_weights, k) for k in flow_weights]
    out = B.logits(B.run(flow, x))
    grads = _zeros_for_unused(torch.autograd.grad(out.sum(), params, allow_unused=True), flow_weights)
    # half-precision weights still get float32 scores: synaptic flow overflows float16 at once
    return {k: (p.detach() * g).abs().to(torch.promote_types(_tensor(weights, k).dtype, torch.float32))
            for k, p, g in zip(weights, params, grads)}


# ---- Wanda: |W| · ‖X_j‖ over calibration inputs --------------------------------------------


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches in GEMM column order: (positions, in·kh·kw); numeric padding only."""
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    padding = cast(tuple[int, ...], module.padding)  # the caller handles string padding elsewhere
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def mha_out_proj_input(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor:
    """What ``module.out_proj`` sees: MHA applies it inside a functional call, so no hook on
    ``out_proj`` fires; we replay the attention with an identity output projection."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    call = dict(zip(names, args)) | kwargs
    query, key, value = call["query"], call["key"], call["value"]
    if module.batch_first and query.dim() == 3:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    e = module.embed_dim
    separate = not module._qkv_same_embed_dim
    out, _ = F.multi_head_attention_forward(
        query, key, value, e, module.num_heads, module.in_proj_weight, module.in_proj_bias,
        module.bias_k, module.bias_v, module.add_zero_attn, 0.0,
        torch.eye(e, dtype=query.dtype, device=query.device), None, training=False,
        key_padding_mask=call.get("key_padding_mask"), need_weights=False, attn_mask=call.get("attn_mask"),
        use_separate_proj_weight=separate, q_proj_weight=module.q_proj_weight,
        k_proj_weight=module.k_proj_weight, v_proj_weight=module.v_proj_weight,
        is_causal=call.get("is_causal", False))
    return out


def _input_sq(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """Σ x_j² over the batch for every GEMM column, shaped to broadcast against the GEMM weight."""
    if isinstance(module, nn.MultiheadAttention):
        inputs = [kwargs.get(n, a) for n, a in zip(("query", "key", "value"), args + (None,) * 3)]
        sums = [x.detach().reshape(-1, x.shape[-1]).pow(2).sum(0) for x in inputs]
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            return torch.cat([s.expand(e, -1) for s in sums])
        return torch.cat([s.expand(e, -1) for s in sums], dim=1)  # q|k|v weights sit side by side
    x = args[0] if args else next(iter(kwargs.values()))
    x = x.detach()
    if isinstance(module, nn.Embedding):
        counts = torch.bincount(x.reshape(-1), minlength=module.num_embeddings).to(module.weight.dtype)
        return counts[:, None]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str):
        patches = _conv_patches(module, x.to(module.weight.dtype))
        per_group = module.in_channels // module.groups * patches.shape[1] // module.in_channels
        sq = patches.pow(2).sum(0).reshape(module.groups, per_group)
        return sq.repeat_interleave(module.out_channels // module.groups, dim=0)
    if isinstance(module, nn.modules.conv._ConvNd):  # Conv3d or string padding: per-channel norm
        sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1)
        k = module.weight[0].numel() // (module.in_channels // module.groups)
        sq = sq.reshape(module.groups, -1).repeat_interleave(k, dim=1)
        return sq.repeat_interleave(module.out_channels // module.groups, dim=0)
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)[None, :]  # Linear, HF Conv1D


@criterion("wanda", needs_data=True, row_wise=True, layer_stats="norms")
def wanda(model, weights: Weights, batches, *_: Any) -> Scores:
    """Wanda (Sun et al. 2024): |W_ij| · ‖X_j‖₂ over calibration inputs (forward passes only)."""
    modules = {id(m): m for m, _ in weights.values()}
    for k, (module, _param) in weights.items():
        if isinstance(module, nn.RNNBase):  # their hidden-state inputs never pass through a hook
            raise ConfigError(f"criterion 'wanda' cannot see the inputs of recurrent layer '{k}'; "
                             f"use another criterion or exclude the layer")
        if is_experts(module):  # a hook sees every token, not the ones routed to each expert
            raise ConfigError(f"criterion 'wanda' cannot see which tokens reach each expert of '{k}'; "
                              f"use another criterion or exclude '*experts*'")
    sq: dict[int, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = _input_sq(module, args, kwargs)
        sq[id(module)] = sq[id(module)] + s if id(module) in sq else s

    def attention_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        x = mha_out_proj_input(module, args, kwargs).detach()
        s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)[None, :]
        key = id(module.out_proj)
        sq[key] = sq[key] + s if key in sq else s

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()]
    handles += [m.register_forward_pre_hook(attention_hook, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention) and id(m.out_proj) in modules]
    try:
        with torch.no_grad():
            for batch in batches:
                B.run(model, B.to_device(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    # input norms over every rank's batches; dict order is the same on every rank
    distributed.all_reduce_sum_(sq.values())
    scores = {}
    for k, (module, param) in weights.items():
        weight = getattr(module, param).detach()
        if id(module) not in sq:
            raise ConfigError(f"criterion 'wanda': layer '{k}' saw no input in the calibration batches")
        norms = sq[id(module)].sqrt()
        if isinstance(module, nn.MultiheadAttention) and param in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            start = {"q": 0, "k": 1, "v": 2}[param[0]]
            widths = [module.embed_dim, module.kdim, module.vdim]
            offset = sum(widths[:start])
            norms = norms[:, offset: offset + widths[start]]
        gemm = to_gemm(module, weight).abs() * norms
        scores[k] = gemm.t().contiguous() if is_hf_conv1d(module) else gemm.reshape(weight.shape)
    return scores


# SparseGPT (Frantar & Alistarh 2023) rebuilds each layer from its inputs' Gram matrix while it
# prunes, so it has no whole-model score: it runs only layer by layer (sparsenets.layerwise).
CRITERIA["sparsegpt"] = Criterion("sparsegpt", None, needs_data=True, layer_stats="gram")
