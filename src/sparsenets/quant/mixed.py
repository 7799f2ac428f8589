"""Mixed precision (HAWQ-V2/V3, Dong et al.): a bit width per layer from its loss curvature.

Rounding layer ``i`` to ``b`` bits moves its weight by ``Δ = Q_b(W_i) − W_i``; to second order the
loss grows by ``½ ΔᵀHΔ``, which HAWQ-V2 approximates by the mean Hessian eigenvalue times
``‖Δ‖²``: ``Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖²``. :func:`hessian_traces` estimates
``Tr(H_i)/n_i`` with Hutchinson's ``E[vᵀHv]`` (Rademacher ``v``, Hessian-vector products by double
backpropagation); :func:`allocate_bits` then picks the ``b_i`` minimising ``Σ Ω_i(b_i)`` within a
budget of bits, a multiple-choice knapsack solved by dynamic programming (HAWQ-V3's ILP).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import batches as B
from ..errors import ConfigError
from ..integrations import distributed
from .spec import QuantSpec, fake_quantize


def hessian_traces(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable,
                   loss_fn: B.LossFn | None = None, samples: int = 4, seed: int = 0) -> dict[str, float]:
    """The mean Hessian trace per element, ``Tr(H)/n``, of each named module's ``weight`` (the
    loss averaged over ``batches``), from ``samples`` Rademacher probes per batch.

    The loss is :func:`sparsenets.batches.loss`'s, except that a dict batch with ``input_ids`` and
    no ``labels`` (calibration text) is scored as a causal LM would be trained on it,
    ``labels = input_ids``. The model runs in eval mode (no dropout noise in the curvature); its
    modes and ``requires_grad`` flags are restored and no ``.grad`` is written.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be a positive integer, got {samples!r}")
    names = list(modules)
    params = [cast(Tensor, modules[n].weight) for n in names]
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    generator = torch.Generator().manual_seed(seed)
    sums, probes = [0.0] * len(names), 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in params:
            w.requires_grad_(True)
        model.eval()
        # fused attention kernels have no double backward; the math kernel does
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for batch in batches:
                loss = B.loss(model, _lm_labels(batch) if loss_fn is None else batch, loss_fn)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # else H = 0
                for s in range(samples):
                    vs = [_rademacher(params[i], generator) for i in live]
                    hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], vs,
                                              retain_graph=s < samples - 1, allow_unused=True) if live else []
                    for i, v, hv in zip(live, vs, hvs):
                        if hv is not None:
                            sums[i] += float((v * hv).sum())
                probes += samples
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    if not probes:
        raise ConfigError("hessian_traces: data gave no batches")
    total = torch.tensor([*sums, probes], dtype=torch.float64, device=params[0].device if params else "cpu")
    distributed.all_reduce_sum_([total])  # every rank's batches
    return {n: float(total[i] / total[-1]) / p.numel() for i, (n, p) in enumerate(zip(names, params))}


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    v = torch.randint(0, 2, like.shape, generator=generator).mul_(2).sub_(1)  # drawn on the CPU: same on every device
    return v.to(like.device, like.dtype)


def _lm_labels(batch: Any) -> Any:
    if not isinstance(batch, dict) or "labels" in batch or "input_ids" not in batch:
        return batch
    labels = batch["input_ids"]
    if batch.get("attention_mask") is not None:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)  # padding: no target
    return {**batch, "labels": labels}


def allocate_bits(sensitivity: Mapping[str, float], weights: Mapping[str, Tensor],
                  choices: Sequence[int] = (2, 3, 4, 8), budget_bits: float = 4.0, *, symmetric: bool = True,
                  group_size: int | None = None, max_units: int = 4096) -> dict[str, int]:
    """Bits per layer from ``choices`` minimising ``Σ sensitivity_i · ‖Q_b(W_i) − W_i‖²`` with
    round-to-nearest ``Q_b`` (``QuantSpec(b, symmetric, group_size)``; ``weights`` in GEMM form),
    at most ``budget_bits`` bits per weight on average over ``weights``.

    The budget counts the codes only, ``Σ b_i·n_i ≤ budget_bits · Σ n_i`` (scales and zero points
    add the same per-group overhead whatever the bits). The knapsack is solved exactly by dynamic
    programming over sizes in units of their greatest common divisor, or, when that needs more than
    ``max_units`` units, over coarser units with every size rounded up: never over the budget,
    possibly a little short of the optimum. Ties go to the fewest bits. A negative sensitivity
    (noise in a trace estimate, or a saddle) counts as 0: rounding is never taken to help.
    """
    names = list(weights)
    if set(sensitivity) != set(names):
        raise ConfigError(f"sensitivity and weights name different layers: {sorted(set(sensitivity) ^ set(names))}")
    bits = sorted(set(choices))
    if not bits:
        raise ConfigError("choices is empty")
    specs = [QuantSpec(b, symmetric, group_size) for b in bits]  # validates them
    for name in names:
        if not math.isfinite(float(sensitivity[name])):
            raise ConfigError(f"sensitivity of '{name}' is {sensitivity[name]}, not a finite number")
    numel = [weights[n].numel() for n in names]
    total = sum(numel)
    spare = math.floor(Fraction(budget_bits) * total) - bits[0] * total  # bits beyond the fewest everywhere
    if spare < 0:
        raise ConfigError(f"a budget of {budget_bits} bits per weight is below the fewest of the bit choices "
                          f"{tuple(bits)}")
    extra = [[(b - bits[0]) * n for b in bits] for n in numel]
    unit = max(math.gcd(*[e for row in extra for e in row]), -(-spare // max_units), 1)
    size = [[-(-e // unit) for e in row] for row in extra]
    cap = spare // unit
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)  # best[c]: the least Σ Ω using exactly c units
    best[0] = 0.0
    picks = []
    for name, sizes in zip(names, size):
        w = weights[name].detach()
        s = max(float(sensitivity[name]), 0.0)
        costs = [s * float((fake_quantize(w, spec).float() - w.float()).pow(2).sum()) for spec in specs]
        new, pick = torch.full_like(best, math.inf), torch.zeros(cap + 1, dtype=torch.long)
        for j, (k, cost) in enumerate(zip(sizes, costs)):
            if k > cap:
                continue
            cand = torch.full_like(best, math.inf)
            cand[k:] = best[:cap + 1 - k] + cost
            better = cand < new  # strict: on a tie the fewer bits stay
            new, pick = torch.where(better, cand, new), torch.where(better, j, pick)
        best = new
        picks.append(pick)
    c = int(torch.argmin(best))  # the first minimum: the fewest units among equal costs
    out = {}
    for name, sizes, pick in reversed(list(zip(names, size, picks))):
        j = int(pick[c])
        out[name], c = bits[j], c - sizes[j]
    return {n: out[n] for n in names}
