"""A byte-level tokenizer: nothing to train or download, and any text has a lossless encoding.

It is Hugging Face's ``ByT5Tokenizer`` with ``extra_ids=0``: pure Python, id = UTF-8 byte + 3
(0-2 are pad, eos, unk), 259 ids in all. Saved next to a model it loads with
``AutoTokenizer.from_pretrained(directory)`` offline, as it needs no vocabulary file.
"""

from __future__ import annotations

from typing import Any

import torch


def byte_tokenizer() -> Any:
    """A new ``transformers.ByT5Tokenizer(extra_ids=0)`` (vocabulary size 259)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def encode(text: str, tokenizer: Any = None) -> torch.Tensor:
    """``text`` as a 1-D LongTensor of ids, without special tokens (no eos); by default byte-level."""
    tokenizer = byte_tokenizer() if tokenizer is None else tokenizer
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
