"""Dynamic int8 activations (W8A8) on the built-in LM, with and without LLM.int8()'s outlier
decomposition, and what the decomposition costs on one layer.

    .venv/bin/python bench/int8_activations.py [--quick] [--thresholds 6,3,2,1] [--threads 2]

Perplexity: every ``nn.Linear`` but ``lm_head`` becomes
``Int8Linear.from_float(linear, outlier_threshold=t)`` (int8 weights, one scale per output
channel; inputs quantized per token at each call); the input columns holding a value above ``t``
in magnitude run in float32 against the dequantized weight. "outlier cols" is the mean, over
layer calls, of the fraction of a call's input columns so flagged. Speed: one 2048×2048 layer
on 512 tokens of N(0, 1) inputs, plain W8A8 against threshold 6.0 on the same inputs (nothing
flagged: only the column max is added) and with 4 columns scaled ×20 (4 flagged), every
candidate once per round in turn; medians over rounds and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.kernels.int8 import describe, outlier_columns
from sparsenets.layers.int8 import Int8Linear
from sparsenets.text import builtin_lm, corpus_text, encode, perplexity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer windows and rounds")
    p.add_argument("--thresholds", default="6,3,2,1", help="outlier thresholds, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=None, help="perplexity windows of 256 tokens (default all)")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.rounds = args.windows or 8, min(args.rounds, 5)
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    return args


def to_int8(model: nn.Module, threshold: float | None) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` but ``lm_head`` an :class:`Int8Linear`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear.from_float(module, outlier_threshold=threshold))
    return model


def flagged_fractions(model: nn.Module, threshold: float) -> tuple[list[float], list]:
    """Hooks appending, at each :class:`Int8Linear` call, the fraction of input columns above ``threshold``."""
    fractions: list[float] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        fractions.append(outlier_columns(inputs[0], threshold).numel() / inputs[0].shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Int8Linear)]
    return fractions, handles


def perplexity_table(args: argparse.Namespace) -> None:
    model, tok = builtin_lm()
    test = encode(corpus_text("test"), tok)
    arms: list[tuple[str, float | None, bool]] = [("fp32", None, False), ("W8A8", None, True)]
    arms += [(f"W8A8 + outliers > {t:g}", t, True) for t in args.thresholds]
    perplexity(model, test, seq_len=256, max_windows=1)  # warm-up, out of the timed arms
    print(f"\nbuilt-in LM, test split, seq_len 256, {args.windows or 'all'} windows\n")
    print("| model | perplexity | outlier cols | time (s) |")
    print("|---|---:|---:|---:|")
    for label, threshold, int8 in arms:
        m = to_int8(model, threshold) if int8 else model
        fractions, handles = flagged_fractions(m, threshold) if threshold is not None else ([], [])
        start = time.perf_counter()
        ppl = perplexity(m, test, seq_len=256, max_windows=args.windows)
        seconds = time.perf_counter() - start
        for h in handles:
            h.remove()
        cols = f"{100 * statistics.fmean(fractions):.2f}%" if fractions else "—"
        print(f"| {label} | {ppl:.4f} | {cols} | {seconds:.1f} |")


def speed_table(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(2048, 2048)
    x = torch.randn(512, 2048, generator=g)
    x_out = x.clone()
    x_out[:, [3, 700, 1500, 2001]] *= 20
    plain, split = Int8Linear.from_float(linear).eval(), Int8Linear.from_float(linear, outlier_threshold=6.0).eval()
    assert outlier_columns(x, 6.0).numel() == 0 and outlier_columns(x_out, 6.0).numel() == 4
    fns = {"fp32 F.linear": lambda: F.linear(x_out, linear.weight, linear.bias),
           "W8A8": lambda: plain(x_out),
           "W8A8 + outliers > 6, none flagged": lambda: split(x),
           "W8A8 + outliers > 6, 4 flagged": lambda: split(x_out)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(2 + args.rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
    print(f"\n2048x2048 layer, 512 tokens, {torch.get_num_threads()} threads, {args.rounds} rounds; {describe()}\n")
    print("| layer | median ms | best ms | × W8A8 (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    for name, ms in times.items():
        ratio = statistics.median(a / b for a, b in zip(ms, times["W8A8"], strict=True))
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f} | {ratio:.2f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    perplexity_table(args)
    speed_table(args)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
