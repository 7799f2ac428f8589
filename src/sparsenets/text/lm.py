"""A small built-in causal LM, trained locally on the corpus' train split: the test bed for LLM pruning.

It is a ``transformers.LlamaForCausalLM`` (RMSNorm, rotary positions, grouped-query attention,
SwiGLU) at a size a 2-core CPU trains in minutes, on the byte-level tokenizer, so comparisons
of pruning methods on it run offline and exercise the same module names as a real Llama.
Training is seeded (initialisation and batches), AdamW with linear warmup then cosine decay;
:func:`fine_tune` runs the same recipe on any model's trainable parameters (adapters, healing).
``LMConfig(data="prose")`` (or ``"code"``) trains on one kind of paragraph only, a base model
for experiments on adapting to a new domain.

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
    data: str = "all"  # the train split's "all" text, or only its "prose" or "code" paragraphs (domain_text)

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise ConfigError(f"data={self.data!r}: expected one of {', '.join(DATA)}")


DATA = ("all", *corpus.KINDS)


def training_text(config: LMConfig) -> str:
    """The text ``config`` trains on: the train split, or its paragraphs of one kind."""
    return corpus.corpus_text("train") if config.data == "all" else corpus.domain_text("train", config.data)


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
    decay span them) on the train split (or its ``config.data`` paragraphs); no cache."""
    config = config or LMConfig()
    steps = config.steps if steps is None else steps
    return fine_tune(untrained_lm(config), encode(training_text(config)), steps=steps, lr=config.lr,
                     seq_len=config.seq_len, batch_size=config.batch_size, warmup_steps=config.warmup_steps,
                     weight_decay=config.weight_decay, seed=config.seed, progress=progress,
                     label="training the built-in LM")


def fine_tune(model: Any, ids: torch.Tensor, *, steps: int, lr: float, seq_len: int = 256, batch_size: int = 8,
              warmup_steps: int = 0, weight_decay: float = 0.0, seed: int = 0, progress: bool = False,
              label: str = "fine-tuning") -> Any:
    """Train ``model``'s parameters that require grad, in place, on ``steps`` batches of random
    ``seq_len`` windows of ``ids`` (seeded by ``seed``): next-token cross-entropy, AdamW (no weight
    decay on vectors: norms' gains, biases), linear warmup then cosine decay to 0, gradients
    clipped to norm 1. The recipe :func:`train_lm` trains with; returns ``model`` in eval mode."""
    if steps < 1:
        raise ConfigError(f"steps={steps}: must be at least 1")
    if not 2 <= seq_len <= ids.numel():
        raise ConfigError(f"seq_len={seq_len}: must be between 2 and the {ids.numel()} tokens given")
    model.train()
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    rest = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup_steps))
    bar = Progress(steps, label, progress)
    try:
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
            batch = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
            logits = model(input_ids=batch).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
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

    fields = dataclasses.asdict(config)
    if config.data == "all":  # the key from before the field existed: models cached then stay valid
        del fields["data"]
    what = {"config": fields, "steps": steps, "corpus": corpus.SHA256,
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
