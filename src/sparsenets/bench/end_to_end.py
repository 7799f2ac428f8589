"""End to end: a whole transformer block pruned to block sparsity, compressed, and timed.

Two models, both built locally (nothing is downloaded): a transformer MLP block (``Linear →
GELU → Linear``) and a one-layer Llama (attention, SwiGLU MLP, RMSNorm, rotary embeddings)
from a ``LlamaConfig`` when ``transformers`` is installed. Each is pruned with magnitude to
``block:32x32`` at the given sparsity (every Linear), turned into block-sparse layers by
:func:`sparsenets.compress` (which times each layer's candidates and keeps the fastest), and
timed against the same model dense, in interleaved rounds under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..utils import timing

MODELS = ("mlp", "llama")


def mlp_block(hidden: int = 1024, ffn: int = 4096) -> tuple[nn.Module, torch.Tensor]:
    """A transformer feed-forward block and one batch of ``rows`` tokens (set by the caller)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).eval()
    return model, torch.randn(1, hidden)


def llama_block(hidden: int = 1024, ffn: int = 2816, heads: int = 16) -> tuple[nn.Module, torch.Tensor]:
    """A one-layer Llama (no LM head) built from a config, and one token of input ids."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=1, vocab_size=256,
                         max_position_embeddings=4096, use_cache=False)
    return LlamaModel(config).eval(), torch.zeros(1, 1, dtype=torch.long)


def _batch(model: str, example: torch.Tensor, rows: int) -> torch.Tensor:
    if model == "mlp":
        return torch.randn(rows, example.shape[-1])
    return torch.randint(0, 256, (1, rows))  # one sequence of `rows` tokens


def _call(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def compressed(model: nn.Module, x: torch.Tensor, sparsity: float, block: int = 32,
               autotune: bool = True) -> nn.Module:
    """``model`` pruned to ``block:{block}x{block}`` at ``sparsity`` and compressed (a new model);
    ``autotune=False`` takes compress's density rule instead of timing each layer."""
    from .. import compress, sparsify_

    pruned = sparsify_(copy.deepcopy(model), {"sparsity": sparsity, "pattern": f"block:{block}x{block}",
                                               "module_types": ["Linear"]})
    return compress(pruned, x, autotune=autotune).eval()  # the masks tell compress the pattern


def measure(model_name: str, sparsity: float, rows: int, threads: int, repeats: int = 15) -> dict:
    """One row: dense and compressed medians (ms) and the speedup, at ``threads`` threads."""
    build = {"mlp": mlp_block, "llama": llama_block}[model_name]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense, example = build()
        x = _batch(model_name, example, rows)
        with torch.no_grad():
            sparse = compressed(dense, x, sparsity)
        with torch.inference_mode():
            found = timing.interleaved({"dense": _call(dense, x), "sparsenets": _call(sparse, x)},
                                       rounds=repeats, min_rounds=repeats, warmup=2)
    finally:
        torch.set_num_threads(before)
    ms = found.median_ms()
    kinds = sorted({type(m).__name__ for m in sparse.modules() if "Sparse" in type(m).__name__})
    return {"model": model_name, "sparsity": sparsity, "rows": rows, "threads": threads, "ms": ms,
            "speedup": ms["dense"] / ms["sparsenets"], "layers": kinds}


def rows(threads: list[int], sparsity: float = 0.9, batch: int = 64, repeats: int = 15,
         models: tuple[str, ...] = MODELS) -> list[dict]:
    """Every model at every thread count (``llama`` only when transformers is installed)."""
    import importlib.util

    wanted = [m for m in models if m != "llama" or importlib.util.find_spec("transformers")]
    return [measure(m, sparsity, batch, t, repeats) for m in wanted for t in threads]
