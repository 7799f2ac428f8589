"""A small built-in causal LM, trained locally on the corpus' train split: the test bed for LLM pruning.

It is a ``transformers.LlamaForCausalLM`` (RMSNorm, rotary positions, grouped-query attention,
SwiGLU) at a size a 2-core CPU trains in minutes, on the byte-level tokenizer, so comparisons
of pruning methods on it run offline and exercise the same module names as a real Llama.
Training is seeded (initialisation and batches), AdamW with linear warmup then cosine decay.

A trained model is cached under ``sparsenets.utils.cache.root()/lm``, keyed by the config,
the steps, the corpus' sha256 and the torch and transformers versions, so a model trained
under anything else is never reused; the weights are written atomically as safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..utils import atomic, cache
from . import corpus
from ._progress import Progress
from .tokenizer import byte_tokenizer, encode


@dataclass(frozen=True)
class LMConfig:
    """Architecture and training recipe of the built-in LM; the defaults are the built-in model."""

    # Sized for a 2-core CPU: 0.8M parameters, 1000 steps of 8x256 bytes (2M tokens, ~6 passes over
    # train) take ~4 CPU-minutes and reach test perplexity 3.39 (unigram: 27). Wider (192-256) models
    # cost 2-4x the time per step and don't get there in a few minutes.
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 2/3
    intermediate_size: int = 352  # ~2.75x hidden: SwiGLU's three matrices cost what a 4x MLP's two do
    seq_len: int = 256  # train at the length perplexity is measured at: rotary positions don't extrapolate
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0


def untrained_lm(config: LMConfig | None = None) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` of ``config``, seeded by ``config.seed``, in eval mode."""
    import transformers

    config = config or LMConfig()
    hf_config = transformers.LlamaConfig(
        vocab_size=len(byte_tokenizer()), hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=max(config.seq_len, 1024),
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
        torch.manual_seed(config.seed)
        model = transformers.LlamaForCausalLM(hf_config)
    return model.eval()


def train_lm(config: LMConfig | None = None, steps: int | None = None, *, progress: bool = False) -> Any:
    """Train :func:`untrained_lm` for ``steps`` (default ``config.steps``; the warmup and cosine
    decay span them) on the train split; no cache."""
    config = config or LMConfig()
    steps = config.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"steps={steps}: must be at least 1")
    model = untrained_lm(config).train()
    ids = encode(corpus.corpus_text("train"))
    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms' gains
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, config.warmup_steps))
    bar = Progress(steps, "training the built-in LM", progress)
    try:
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - config.seq_len + 1, (config.batch_size,), generator=generator)
            batch = torch.stack([ids[s: s + config.seq_len] for s in starts.tolist()])
            logits = model(input_ids=batch).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.update(note=f"loss {loss.item():.3f}")
    finally:
        bar.close()
    return model.eval()


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def cache_key(config: LMConfig, steps: int) -> str:
    """What a cached model must match: anything that changes the trained weights."""
    import transformers

    what = {"config": dataclasses.asdict(config), "steps": steps, "corpus": corpus.SHA256,
            "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def builtin_lm(steps: int | None = None, *, config: LMConfig | None = None,
               progress: bool = False) -> tuple[Any, Any]:
    """The built-in LM, trained (or loaded from the cache when trained before), in eval mode, and its tokenizer."""
    from safetensors.torch import load, save

    config = config or LMConfig()
    steps = config.steps if steps is None else steps
    path = cache.cache_dir("lm") / f"builtin-{cache_key(config, steps)}.safetensors"
    if path.exists():
        model = untrained_lm(config)
        model.load_state_dict(load(path.read_bytes()))
    else:
        model = train_lm(config, steps, progress=progress)
        blob = save({k: v.contiguous() for k, v in model.state_dict().items()})

        def write(file: IO) -> None:
            file.write(blob)

        atomic.write_with(path, write)
    return model.eval(), byte_tokenizer()


def save_builtin_lm(directory: str | os.PathLike, steps: int | None = None, *,
                    config: LMConfig | None = None) -> Path:
    """Write the built-in LM and its tokenizer as a Hugging Face directory (safetensors) that
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(directory)`` load offline."""
    model, tokenizer = builtin_lm(steps, config=config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
