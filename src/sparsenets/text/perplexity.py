"""Perplexity over a token stream, by the protocol of the LLM pruning papers (SparseGPT, Wanda).

The stream is cut into non-overlapping windows of ``seq_len`` tokens (the ragged tail is
dropped); each window is scored on its own, so its first token is never predicted, and the
result is exp of the mean next-token negative log-likelihood over every predicted position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._progress import Progress


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``ids`` (1-D) as ``(n, seq_len)`` non-overlapping windows, the tail that does not fill one dropped."""
    if ids.dim() != 1:
        raise ConfigError(f"ids: expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len}: need at least 2 tokens per window (one to predict from)")
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"seq_len={seq_len}: longer than the {ids.numel()} tokens given, no window fits")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = False) -> float:
    """exp(mean next-token NLL) of a causal LM (``model(input_ids=...).logits``) over ``ids``' windows."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows={max_windows}: must be at least 1 (or None for all)")
    chunks = windows(ids, seq_len)[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = Progress(len(chunks), "perplexity", progress)
    try:
        for batch in chunks.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()  # float32 loss whatever the model's dtype
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()  # sums in float64 across batches
            count += batch[:, 1:].numel()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return math.exp(total / count)
