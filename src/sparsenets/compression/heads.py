"""Removing attention heads from BERT- and GPT-2-style attention.

Heads are independent until the output projection sums them, so a head can go when the
output projection ignores it (its columns are zero) or when its value projection has no
weights: attention weights sum to one, so such a head outputs its value bias whatever it
attends to, and that constant folds into the output projection's bias (eval mode: attention
dropout and ``head_mask`` break the sum-to-one). At least one head stays.

``nn.MultiheadAttention`` ties its head count to ``embed_dim`` (the query input width), so
its heads cannot be removed while keeping the module; they are reported and kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..gemm import is_hf_conv1d
from . import surgery as S


def _removable(unused: Tensor, value_dead: Tensor) -> Tensor:
    removable = unused | value_dead
    if removable.all():
        removable[int(torch.argmin(unused.to(torch.int8)))] = False
    return removable


def _rows(heads: Tensor, head_dim: int, offset: int = 0) -> Tensor:
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


# The attention modules are Hugging Face's, recognised by their attributes (see _is_bert_attention,
# _is_gpt2_attention), so they are typed as Any.
def _shrink_bert(name: str, attention: Any) -> str | None:
    attn, dense = attention.self, attention.output.dense
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    unused = ~dense.weight.detach().reshape(dense.out_features, heads, head_dim).any(dim=(0, 2))
    value_dead = ~attn.value.weight.detach().reshape(heads, head_dim, -1).any(dim=(1, 2))
    removable = _removable(unused, value_dead)
    if not removable.any():
        return None
    fold = removable & ~unused & (S.bias_or_zeros(attn.value).reshape(heads, head_dim) != 0).any(dim=1)
    if fold.any():
        columns = _rows(fold.nonzero().squeeze(1), head_dim)
        S.fold_constant_inputs(dense, columns, S.bias_or_zeros(attn.value)[columns])
    kept = (~removable).nonzero().squeeze(1)
    rows = _rows(kept, head_dim)
    for projection in (attn.query, attn.key, attn.value):
        S.keep_outputs(projection, rows)
    S.keep_inputs(dense, rows)
    attn.num_attention_heads = kept.numel()
    attn.all_head_size = rows.numel()
    return f"{name}: removed {int(removable.sum())} of {heads} heads"


def _shrink_gpt2(name: str, attention: Any) -> str | None:
    c_attn, c_proj = attention.c_attn, attention.c_proj
    heads, head_dim, split = attention.num_heads, attention.head_dim, attention.split_size
    unused = ~c_proj.weight.detach().reshape(heads, head_dim, -1).any(dim=(1, 2))
    value_weight = c_attn.weight.detach()[:, 2 * split: 3 * split]
    value_dead = ~value_weight.reshape(-1, heads, head_dim).any(dim=(0, 2))
    removable = _removable(unused, value_dead)
    if not removable.any():
        return None
    value_bias = c_attn.bias.detach()[2 * split: 3 * split]
    fold = removable & ~unused & (value_bias.reshape(heads, head_dim) != 0).any(dim=1)
    if fold.any():
        columns = _rows(fold.nonzero().squeeze(1), head_dim)
        S.fold_constant_inputs(c_proj, columns, value_bias[columns])
    kept = (~removable).nonzero().squeeze(1)
    S.keep_outputs(c_attn, torch.cat([_rows(kept, head_dim, part * split) for part in range(3)]))
    S.keep_inputs(c_proj, _rows(kept, head_dim))
    attention.num_heads = kept.numel()
    attention.split_size = kept.numel() * head_dim
    return f"{name}: removed {int(removable.sum())} of {heads} heads"


def _is_bert_attention(module: nn.Module) -> bool:
    attn, output = getattr(module, "self", None), getattr(module, "output", None)
    return (hasattr(attn, "num_attention_heads") and hasattr(attn, "attention_head_size")
            and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("query", "key", "value"))
            and isinstance(getattr(output, "dense", None), nn.Linear))


def _is_gpt2_attention(module: nn.Module) -> bool:
    return (is_hf_conv1d(getattr(module, "c_attn", None)) and is_hf_conv1d(getattr(module, "c_proj", None))
            and hasattr(module, "num_heads") and hasattr(module, "split_size")
            and not getattr(module, "is_cross_attention", False))


def _mha_dead_heads(mha: nn.MultiheadAttention) -> int:
    weight = mha.out_proj.weight.detach().reshape(mha.embed_dim, mha.num_heads, mha.head_dim)
    return int((~weight.any(dim=(0, 2))).sum())


def shrink_heads(model: nn.Module, skip: set[int]) -> list[str]:
    """Remove removable heads everywhere in ``model``; returns one line per attention module changed.

    Modules whose id is in ``skip`` (shared between paths) are left alone.
    """
    notes = []
    for name, module in model.named_modules():
        if id(module) in skip:
            continue
        if _is_bert_attention(module):
            note = _shrink_bert(name, module)
        elif _is_gpt2_attention(module):
            note = _shrink_gpt2(name, module)
        elif isinstance(module, nn.MultiheadAttention) and (dead := _mha_dead_heads(module)):
            note = (f"{name}: {dead} of {module.num_heads} heads are zero but kept "
                    f"(nn.MultiheadAttention ties its head count to embed_dim)")
        else:
            note = None
        if note:
            notes.append(note)
    return notes
