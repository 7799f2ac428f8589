"""Removing attention heads: BERT- and GPT-2-style attention, and separate q/k/v/o projections.

Heads are independent until the output projection sums them, so a head can go when the
output projection ignores it (its columns are zero) or when its value projection has no
weights: attention weights sum to one, so such a head outputs its value bias whatever it
attends to, and that constant folds into the output projection's bias (eval mode: attention
dropout and ``head_mask`` break the sum-to-one). At least one head stays.

``nn.MultiheadAttention`` ties its head count to ``embed_dim`` (the query input width), so
its heads cannot be removed while keeping the module; they are reported and kept. So are T5's:
the first layer of a stack computes one position bias for all heads and passes it to the
others, so every layer of a stack must keep the same heads. And so are Phi-3's: its forward
splits the fused ``qkv_proj`` output at ``config.num_attention_heads``, one count for all layers.

With separate projections (Llama, Mistral, Qwen2, OPT, ViT, DistilBERT) the unit is a group
(see :mod:`sparsenets.attention`): one key/value head and the query heads that read it. Their
forwards reshape with ``-1`` heads, so per-layer counts work; the count attributes a module
has (``num_heads``, ``num_attention_heads``, ``n_heads``, ``num_key_value_heads``) are set to
what it keeps, and ``num_key_value_groups`` stays as whole groups go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import Projections, fused_qkv, projections
from ..gemm import is_hf_conv1d
from . import surgery as S

QUERY_COUNTS = ("num_heads", "num_attention_heads", "n_heads")  # what forwards read as the query head count
KV_COUNTS = ("num_key_value_heads",)


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


def _shrink_projections(name: str, attention: nn.Module, p: Projections) -> str | None:
    groups, size = p.kv_heads, p.group_size  # read before the projections shrink
    width = size * p.head_dim  # output-projection columns of one group
    unused = ~p.o.weight.detach().reshape(p.o.out_features, groups, width).any(dim=(0, 2))
    value_dead = ~p.v.weight.detach().reshape(groups, p.head_dim, -1).any(dim=(1, 2))
    removable = _removable(unused, value_dead)
    if not removable.any():
        return None
    value_bias = S.bias_or_zeros(p.v).reshape(groups, p.head_dim)
    fold = removable & ~unused & (value_bias != 0).any(dim=1)
    if fold.any():  # every query head of a group outputs its value head's bias
        folded = fold.nonzero().squeeze(1)
        S.fold_constant_inputs(p.o, _rows(folded, width), value_bias[folded].repeat(1, size).reshape(-1))
    kept = (~removable).nonzero().squeeze(1)
    S.keep_outputs(p.q, _rows(kept, width))
    for projection in (p.k, p.v):
        S.keep_outputs(projection, _rows(kept, p.head_dim))
    S.keep_inputs(p.o, _rows(kept, width))
    _set_counts(attention, kept.numel() * size, kept.numel())
    return (f"{name}: removed {int(removable.sum())} of {groups} "
            f"{'heads' if size == 1 else f'key/value groups ({size} query heads each)'}")


def _set_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    for names, count in ((QUERY_COUNTS, heads), (KV_COUNTS, kv_heads)):
        for attr in names:
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, count)


def _shares_position_bias(module: nn.Module) -> bool:
    """T5: one layer's position bias (n_heads wide) is added in every layer of the stack."""
    return hasattr(module, "has_relative_attention_bias")


def _zero_output_groups(o: nn.Linear, groups: int) -> int:
    return int((~o.weight.detach().reshape(o.out_features, groups, -1).any(dim=(0, 2))).sum())


def _config_reader(module: nn.Module) -> str:
    return f"{type(module).__name__} reads head counts from its config"


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


def _shrink_separate(name: str, module: nn.Module, p: Projections) -> str | None:
    if not _shares_position_bias(module):
        return _shrink_projections(name, module, p)
    if dead := _zero_output_groups(p.o, p.kv_heads):
        return (f"{name}: {dead} of {p.kv_heads} heads are zero; kept: {type(module).__name__} shares "
                f"one position bias of all heads between the layers of a stack")
    return None


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
        elif (p := projections(module)) is not None:
            note = _shrink_separate(name, module, p)
        elif (f := fused_qkv(module)) is not None and (dead := _zero_output_groups(f.o, f.kv_heads)):
            note = f"{name}: {dead} of {f.kv_heads} key/value groups are zero; kept: {_config_reader(module)}"
        elif isinstance(module, nn.MultiheadAttention) and (dead := _mha_dead_heads(module)):
            note = (f"{name}: {dead} of {module.num_heads} heads are zero; kept: "
                    f"nn.MultiheadAttention ties its head count to embed_dim")
        else:
            note = None
        if note:
            notes.append(note)
    return notes
