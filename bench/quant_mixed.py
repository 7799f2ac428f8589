"""Mixed precision (HAWQ) against uniform bit widths on the built-in LM, RTN and GPTQ.

Uniform 2, 3 and 4 bits per weight against ``average_bits`` 2.5, 3 and 3.5 chosen from
``bit_choices`` (2, 3, 4, 8) by Hessian-trace sensitivity, and 3.5 from (3, 4, 8); one scale per
output channel, ``lm_head`` left in float. Each cell is the mean ± standard deviation of the test
perplexity over the LM's training seeds; the paired column says on how many seeds mixed beat
the uniform width just below its budget.

    .venv/bin/python bench/quant_mixed.py                    # 3 seeds, ~6 minutes on 2 cores
    .venv/bin/python bench/quant_mixed.py --seeds 0 --quick  # one model, fewer windows
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch

from sparsenets.quant import QuantizedLinear, quantize_
from sparsenets.text import LMConfig, builtin_lm, calibration_batches, corpus_text, encode, perplexity

UNIFORM = {"uniform 2": {"bits": 2}, "uniform 3": {"bits": 3}, "uniform 4": {"bits": 4}}
MIXED = {"mixed 2.5": {"average_bits": 2.5}, "mixed 3": {"average_bits": 3.0},
         "mixed 3.5": {"average_bits": 3.5}, "mixed 3.5 of (3,4,8)": {"average_bits": 3.5, "bit_choices": (3, 4, 8)}}
METHODS = ("rtn", "gptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows (traces and GPTQ)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=None, help="test windows (default: the whole split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the LM")
    parser.add_argument("--quick", action="store_true", help="8 calibration windows, 16 test windows")
    args = parser.parse_args()
    if args.quick:
        args.calibration, args.test_windows = 8, args.test_windows or 16
    results: dict[tuple[str, str], list[float]] = {}
    bits_seen: dict[str, float] = {}
    for seed in args.seeds:
        model, tokenizer = builtin_lm(config=LMConfig(seed=seed), progress=True)
        train, test = encode(corpus_text("train"), tokenizer), encode(corpus_text("test"), tokenizer)
        data = calibration_batches(train, args.calibration, args.seq_len, seed=seed)
        for method in METHODS:
            for label, options in {**UNIFORM, **MIXED}.items():
                m = quantize_(copy.deepcopy(model), {"group_size": None, "method": method, **options}, data=data)
                value = perplexity(m, test, seq_len=args.seq_len, max_windows=args.test_windows)
                results.setdefault((method, label), []).append(value)
                bits_seen[label] = average_bits(m)
                print(f"seed {seed} {method} {label}: {value:.3f} ({bits_seen[label]:.2f} bits)", flush=True)

    def cell(method: str, label: str) -> str:
        values = results[(method, label)]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"

    labels = [*UNIFORM, *MIXED]
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, per-channel scales; bits per weight in the header\n")
    print("| method | " + " | ".join(f"{label} ({bits_seen[label]:.2f})" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for method in METHODS:
        print(f"| {method.upper()} | " + " | ".join(cell(method, label) for label in labels) + " |")
    print("\nmixed better than the uniform width below its budget, seeds won:")
    for method in METHODS:
        for label, options in MIXED.items():
            below = f"uniform {math.floor(options['average_bits'])}"
            wins = sum(a < b for a, b in zip(results[(method, label)], results[(method, below)]))
            print(f"  {method.upper()} {label} vs {below}: {wins}/{len(args.seeds)}")


def average_bits(model: torch.nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(m.bits * m.codes.numel() for m in layers) / sum(m.codes.numel() for m in layers)


if __name__ == "__main__":
    main()
