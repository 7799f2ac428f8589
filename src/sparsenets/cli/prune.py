"""``sparsenets prune``: a Hugging Face checkpoint directory in, a pruned one out, block by block.

Calibration windows come from the corpus that ships with sparsenets (``sparsenets.text``),
perplexity is measured on its held-out test split before and after. Each pruned block is
written to ``OUT/.partial/`` as it finishes, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..utils.atomic import write_json

PARTIAL = ".partial"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="prune a Hugging Face language model block by block (SparseGPT, Wanda, magnitude)",
        description="Load a causal language model saved with save_pretrained, prune it block by block on "
                    "calibration windows of the built-in corpus, and write a directory that from_pretrained "
                    "loads (zeros kept) with the masks beside it. Perplexity on the corpus's held-out split "
                    "is printed before and after. Rerun the same command to resume a killed run.",
        epilog="examples:\n"
               "  sparsenets prune ./llama --criterion sparsegpt --pattern 2:4 --out ./llama-2of4\n"
               "  sparsenets prune ./llama --criterion wanda --sparsity 0.7 --allocation owl --out ./llama-owl\n"
               "  sparsenets prune ./llama --criterion magnitude --sparsity 0.5 --no-eval --out ./llama-mag")
    parser.add_argument("model", type=Path, help="Hugging Face checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the pruned model to")
    parser.add_argument("--criterion", default="sparsegpt", help="sparsegpt (default), wanda or magnitude")
    parser.add_argument("--pattern", default="unstructured", help="unstructured (default), N:M such as 2:4, block:RxC")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights to remove (default 0.5; N:M fixes its own)")
    parser.add_argument("--allocation", default="uniform", help="uniform (default), erk or owl")
    add_calibration_arguments(parser, left="dense")
    parser.set_defaults(func=_run)


def add_calibration_arguments(parser: argparse.ArgumentParser, left: str) -> None:
    """The options every command that calibrates on the built-in corpus shares."""
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--exclude", nargs="*", default=["lm_head"],
                        help=f"module globs left {left} (default lm_head)")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="perplexity on at most this many test windows (default: the whole test split)")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")


def check_calibration(args: argparse.Namespace) -> None:
    for flag, value in (("--calibration", args.calibration), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def _run(args: argparse.Namespace) -> int:
    from .. import sparsify_
    from ..config import SparsityConfig
    from ..integrations.huggingface import save_pretrained

    config = SparsityConfig(sparsity=args.sparsity, pattern=args.pattern, criterion=args.criterion,
                            allocation=args.allocation, exclude=args.exclude, seed=args.seed)
    check_calibration(args)
    model, tokenizer = _load(args.model)
    calibration, test = _data(tokenizer, args)
    partial = args.out / PARTIAL
    fingerprint = _fingerprint(args, config)
    done = _resume(model, partial, fingerprint)
    if not args.no_eval and not done:
        print(f"perplexity before: {_perplexity(model, test, args):.3f}")
    bar = _progress(model, config)
    bar.update(done)
    start = time.perf_counter()

    def finished(stack: Any, index: int, seconds: float) -> None:
        if stack.name != bar.stack or index < done:
            return
        _save_block(model, stack.block_name(index), partial, index)
        bar.set_postfix_str(f"{seconds:.1f} s/block")
        bar.update(1)

    sparsify_(model, config, data=calibration, skip_blocks=done, on_block=finished)
    bar.update(bar.total - bar.n)  # magnitude prunes without visiting the blocks
    bar.close()
    print(f"pruned in {time.perf_counter() - start:.1f} s")
    if not args.no_eval:
        print(f"perplexity after:  {_perplexity(model, test, args):.3f}")
    save_pretrained(model, args.out, config=config)
    tokenizer.save_pretrained(args.out)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


def _load(directory: Path) -> tuple[nn.Module, Any]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("sparsenets prune needs transformers: pip install transformers") from None
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def _data(tokenizer: Any, args: argparse.Namespace) -> tuple[list[dict], torch.Tensor]:
    from ..text import calibration_batches, corpus_text, encode

    train = encode(corpus_text("train"), tokenizer)
    test = encode(corpus_text("test"), tokenizer)
    return calibration_batches(train, args.calibration, args.seq_len, seed=args.seed), test


def _perplexity(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> float:
    from ..text import perplexity

    return perplexity(model, ids, seq_len=args.seq_len, max_windows=args.eval_windows, progress=True)


def _progress(model: nn.Module, config: Any) -> Any:
    """A bar over the blocks of the model's first stack."""
    from tqdm.auto import tqdm

    from ..layerwise.blocks import find_stacks
    from ..targets import find_units

    holds = {m.module_name for u in find_units(model, config) for m in u.members}
    stacks = find_stacks(model, holds)
    bar = tqdm(total=len(stacks[0].blocks) if stacks else 0, desc="pruning", unit="block")
    bar.stack = stacks[0].name if stacks else None
    return bar


# ---- resuming ----------------------------------------------------------------------------------


def _fingerprint(args: argparse.Namespace, config: Any) -> str:
    """What makes two runs the same run: the model's files and every option that changes the result."""
    model_files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in args.model.iterdir()
                         if p.is_file())
    described = {"config": config.to_dict(), "calibration": args.calibration, "seq_len": args.seq_len,
                 "model": str(args.model.resolve()), "files": model_files}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _resume(model: nn.Module, partial: Path, fingerprint: str) -> int:
    """Restore the blocks a killed run finished; returns how many (0 when starting afresh)."""
    stamp = partial / "run.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        raise ConfigError(f"{partial} holds a run with other options or another model: delete it, or rerun "
                          f"with the options it was started with")
    partial.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fingerprint})
    done = 0
    while (partial / f"block_{done}.safetensors").is_file():
        _load_block(model, partial / f"block_{done}.safetensors")
        done += 1
    if done:
        print(f"resuming after {done} pruned block(s) in {partial}")
    return done


def _save_block(model: nn.Module, block_name: str, partial: Path, index: int) -> None:
    """The block's tensors and masks, written atomically (a half-written file never counts)."""
    from ..masking import get_mask

    block = model.get_submodule(block_name)
    tensors: dict[str, torch.Tensor] = {}
    patterns: dict[str, str] = {}
    for name, module in block.named_modules():
        if "parametrizations" in name.split("."):
            continue  # a masked weight is saved under its own name, with its mask
        qual = f"{block_name}.{name}" if name else block_name
        for param in [n for n, _ in module.named_parameters(recurse=False)] + _masked_names(module):
            tensors[f"{qual}.{param}"] = getattr(module, param).detach().contiguous()
            mask = get_mask(module, param)
            if mask is not None:
                tensors[f"{qual}.{param}.mask"] = mask.mask.contiguous()
                patterns[f"{qual}.{param}"] = mask.pattern
    target = partial / f"block_{index}.safetensors"
    scratch = target.with_suffix(".tmp")
    save_file(tensors, scratch, metadata={"patterns": json.dumps(patterns)})
    scratch.replace(target)


def _masked_names(module: nn.Module) -> list[str]:
    parametrizations = getattr(module, "parametrizations", None)
    return list(parametrizations) if parametrizations is not None else []


def _load_block(model: nn.Module, file: Path) -> None:
    from safetensors import safe_open

    from ..masking import attach

    with safe_open(file, "pt") as handle:
        patterns = json.loads((handle.metadata() or {}).get("patterns", "{}"))
    tensors = load_file(file)
    for key, value in tensors.items():
        if key.endswith(".mask"):
            continue
        module_name, _, param = key.rpartition(".")
        module = model.get_submodule(module_name)
        mask = tensors.get(f"{key}.mask")
        if mask is not None:
            attach(module, param, mask, patterns[key])
        with torch.no_grad():
            getattr(module, param).copy_(value) if mask is None else _original(module, param).copy_(value)


def _original(module: nn.Module, param: str) -> torch.Tensor:
    from ..masking import parametrization_list

    return parametrization_list(module, param).original
