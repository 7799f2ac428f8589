"""Calibration batches for one-shot pruning (SparseGPT, Wanda): random windows of training text."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def calibration_batches(ids: torch.Tensor, n: int, seq_len: int, *, seed: int = 0,
                        batch_size: int = 1) -> list[dict]:
    """``n`` windows of ``seq_len`` tokens at random starts in ``ids`` (pass the train split's),
    as ``{"input_ids": LongTensor(batch, seq_len)}`` dicts of ``batch_size`` (the last may be
    smaller); the same for the same ``seed``, whatever the global RNG state."""
    if ids.dim() != 1:
        raise ConfigError(f"ids: expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"n={n}, batch_size={batch_size}: both must be at least 1")
    if not 1 <= seq_len <= ids.numel():
        raise ConfigError(f"seq_len={seq_len}: must be between 1 and the {ids.numel()} tokens given")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=generator)
    rows = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
    return [{"input_ids": batch} for batch in rows.split(batch_size)]
