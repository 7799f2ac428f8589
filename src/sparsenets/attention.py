"""Attention layouts: which rows and columns of an attention module's weights belong to which head.

The head pattern prunes *groups*: a group is one key/value head with the query heads that
read it. Without grouped-query attention (GQA) that is one head; with it (Llama, Mistral,
Qwen2: ``num_key_value_heads < num_attention_heads``) it is one key/value head and its
``num_key_value_groups`` query heads, so that pruning keeps the GQA structure valid and
really removes key and value rows. Scores are averaged over each group.

Known layouts: ``nn.MultiheadAttention``; BERT-style ``self.{query,key,value}`` and
``output.dense``; GPT-2-style fused ``c_attn``/``c_proj``; separate query, key, value and
output projections under any of the names in :data:`PROJECTION_NAMES`; and Phi-3-style fused
``qkv_proj`` (all query rows, then key, then value rows) with ``o_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .gemm import to_gemm
from .patterns import Pattern
from .targets import Member, Unit

# (query, key, value, output) projection names: Llama, Mistral, Qwen2, ViT / OPT, BART / T5 / DistilBERT
PROJECTION_NAMES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                    ("q", "k", "v", "o"), ("q_lin", "k_lin", "v_lin", "out_lin"))
HEAD_DIM_NAMES = ("head_dim", "key_value_proj_dim", "attention_head_size")


@dataclass
class Projections:
    """Separate query, key, value and output projections of one attention module."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads // self.kv_heads


def projections(module: nn.Module) -> Projections | None:
    """The separate q/k/v/o projections of ``module``, if it has them and their sizes fit heads."""
    head_dim = next((getattr(module, n) for n in HEAD_DIM_NAMES if isinstance(getattr(module, n, None), int)), None)
    if not head_dim:
        return None
    for names in PROJECTION_NAMES:
        q, k, v, o = (getattr(module, n, None) for n in names)
        if all(isinstance(layer, nn.Linear) for layer in (q, k, v, o)):
            p = Projections(q, k, v, o, head_dim)  # type: ignore[arg-type]  # all checked above
            if _consistent(p):
                return p
    return None


def _consistent(p: Projections) -> bool:
    return (p.q.out_features % p.head_dim == 0 and p.k.out_features % p.head_dim == 0
            and p.kv_heads > 0 and p.heads % p.kv_heads == 0
            and p.v.out_features == p.k.out_features and p.o.in_features == p.q.out_features)


@dataclass
class Part:
    """One tensor of an attention module and the group of each of its rows (or columns)."""

    module: nn.Module
    param: str
    role: str  # "rows": outputs of q/k/v; "cols": inputs of the output projection; "bias"
    ids: Tensor  # group id of each row, column or bias element


@dataclass
class FusedQKV:
    """One projection stacking [q; k; v] with ``kv_heads`` key/value heads (Phi-3), and the output one."""

    qkv: nn.Linear
    o: nn.Linear
    head_dim: int
    kv_heads: int

    @property
    def heads(self) -> int:
        return self.o.in_features // self.head_dim


def fused_qkv(module: nn.Module) -> FusedQKV | None:
    """The fused ``qkv_proj`` and ``o_proj`` of ``module``, if it has them and their sizes fit heads."""
    qkv, o = getattr(module, "qkv_proj", None), getattr(module, "o_proj", None)
    head_dim, kv_heads = getattr(module, "head_dim", None), getattr(module, "num_key_value_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear) and isinstance(head_dim, int)
            and isinstance(kv_heads, int) and kv_heads > 0):
        return None
    f = FusedQKV(qkv, o, head_dim, kv_heads)
    fits = o.in_features % head_dim == 0 and f.heads % kv_heads == 0
    return f if fits and qkv.out_features == (f.heads + 2 * kv_heads) * head_dim else None


def _group_ids(heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Group of each query row (and output column), and of each key or value row."""
    group_rows = head_dim * (heads // kv_heads)  # query rows of one group
    return torch.arange(heads * head_dim) // group_rows, torch.arange(kv_heads * head_dim) // head_dim


def _fused_parts(f: FusedQKV) -> list[Part]:
    q_ids, kv_ids = _group_ids(f.heads, f.kv_heads, f.head_dim)
    ids = torch.cat([q_ids, kv_ids, kv_ids])
    parts = [Part(f.qkv, "weight", "rows", ids)]
    if f.qkv.bias is not None:
        parts.append(Part(f.qkv, "bias", "bias", ids))
    return parts + [Part(f.o, "weight", "cols", q_ids)]


def _head_rows(rows: int, head_dim: int, heads: int) -> Tensor:
    """Head id of each output row of a projection that stacks [q; k; v] (or just one of them)."""
    return (torch.arange(rows) % (heads * head_dim)) // head_dim


def _projection_parts(p: Projections) -> list[Part]:
    q_ids, kv_ids = _group_ids(p.heads, p.kv_heads, p.head_dim)
    parts = []
    for proj, ids in ((p.q, q_ids), (p.k, kv_ids), (p.v, kv_ids)):
        parts.append(Part(proj, "weight", "rows", ids))
        if proj.bias is not None:
            parts.append(Part(proj, "bias", "bias", ids))
    return parts + [Part(p.o, "weight", "cols", q_ids)]


def _stacked_parts(heads: int, head_dim: int, qkv: list[tuple[nn.Module, str]], out: nn.Module) -> list[Part]:
    """Parts of q/k/v tensors that hold all heads (or [q; k; v] stacked) and an output projection."""
    parts = []
    for module, param in qkv:
        tensor, is_bias = getattr(module, param), param.endswith("bias")
        rows = tensor.shape[0] if is_bias else to_gemm(module, tensor).shape[0]
        parts.append(Part(module, param, "bias" if is_bias else "rows", _head_rows(rows, head_dim, heads)))
    weight = out.weight
    assert isinstance(weight, Tensor)
    cols = to_gemm(out, weight).shape[1]
    return parts + [Part(out, "weight", "cols", torch.arange(cols) // head_dim)]


def attention_layout(module: nn.Module) -> tuple[int, list[Part]] | None:
    """(number of groups, parts) for a known attention module, else None."""
    if isinstance(module, nn.MultiheadAttention):
        separate = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        names = ["in_proj_weight"] if module._qkv_same_embed_dim else separate
        names += ["in_proj_bias"] if module.in_proj_bias is not None else []
        return module.num_heads, _stacked_parts(module.num_heads, module.head_dim, [(module, n) for n in names],
                                                module.out_proj)
    hf: Any = module  # Hugging Face attention, recognised by its attributes
    self_attn: Any = getattr(hf, "self", None)
    output: Any = getattr(hf, "output", None)
    if self_attn is not None and hasattr(self_attn, "num_attention_heads") and hasattr(output, "dense"):
        # BERT-style: attention.self.{query,key,value} and attention.output.dense
        qkv = [(proj, p) for proj in (self_attn.query, self_attn.key, self_attn.value)
               for p in ("weight", "bias") if getattr(proj, p) is not None]
        heads = self_attn.num_attention_heads
        return heads, _stacked_parts(heads, self_attn.attention_head_size, qkv, output.dense)
    if hasattr(hf, "c_attn") and hasattr(hf, "c_proj") and hasattr(hf, "num_heads"):
        if getattr(hf, "is_cross_attention", False):
            return None
        # GPT-2-style: c_attn stacks [q; k; v] (HF Conv1D), c_proj mixes the heads back
        qkv = [(hf.c_attn, p) for p in ("weight", "bias") if getattr(hf.c_attn, p) is not None]
        return hf.num_heads, _stacked_parts(hf.num_heads, hf.head_dim, qkv, hf.c_proj)
    if (p := projections(module)) is not None:
        return p.kv_heads, _projection_parts(p)
    if (f := fused_qkv(module)) is not None:
        return f.kv_heads, _fused_parts(f)
    return None


def head_unit(name: str, module: nn.Module, module_names: dict[nn.Module, str], pattern: Pattern) -> Unit:
    """The unit of one attention module for the head pattern: its groups are heads (or GQA groups)."""
    layout = attention_layout(module)
    assert layout is not None, f"{name} is not an attention module"
    n_groups, parts = layout
    members: list[Member] = []
    dims: list[tuple[int, ...]] = []
    for part in parts:
        tensor = getattr(part.module, part.param)
        if part.role == "bias":
            ids = part.ids
        else:
            rows, cols = to_gemm(part.module, tensor).shape
            ids = part.ids[:, None].expand(rows, cols) if part.role == "rows" else part.ids[None, :].expand(rows, cols)
            dims.append((rows, cols))
        members.append(Member(module_names[part.module], part.param, part.module, ids, is_weight=part.role != "bias"))
    return Unit(name, pattern, members, n_groups, dims)
