"""Perplexity of the built-in LM after one-shot pruning: magnitude, Wanda, SparseGPT, and OWL
allocation, at 50%, 2:4 and 70% (the settings of the Wanda, SparseGPT and OWL papers).

The model is trained locally on the corpus that ships with sparsenets (cached after the first
run); calibration windows come from its train split, perplexity from its test split.

    .venv/bin/python bench/llm_perplexity.py              # the README table
    .venv/bin/python bench/llm_perplexity.py --calibration 32
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import sparsenets as sn
from sparsenets.text import builtin_lm, calibration_batches, corpus_text, encode, perplexity

SETTINGS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}, "70%": {"sparsity": 0.7}}
METHODS = {"magnitude": {"criterion": "magnitude"}, "Wanda": {"criterion": "wanda"},
           "SparseGPT": {"criterion": "sparsegpt"},
           "Wanda + OWL": {"criterion": "wanda", "allocation": "owl"},
           "SparseGPT + OWL": {"criterion": "sparsegpt", "allocation": "owl"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = builtin_lm(progress=True)
    train, test = encode(corpus_text("train"), tokenizer), encode(corpus_text("test"), tokenizer)
    data = calibration_batches(train, args.calibration, args.seq_len)
    dense = perplexity(model, test, seq_len=args.seq_len)
    params = sum(p.numel() for p in model.parameters())
    print(f"built-in LM: {params / 1e6:.2f} M parameters; {args.calibration} x {args.seq_len} calibration tokens; "
          f"test split {len(test):,} tokens\n")
    table = ["| method | " + " | ".join(SETTINGS) + " |", "|---|" + "---:|" * len(SETTINGS),
             "| dense | " + " | ".join(f"{dense:.2f}" for _ in SETTINGS) + " |"]
    for label, method in METHODS.items():
        cells = []
        for setting in SETTINGS.values():
            if "allocation" in method and "pattern" in setting:
                cells.append("—")  # N:M fixes every layer's sparsity: nothing to allocate
                continue
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            sn.sparsify_(pruned, {**method, **setting, "exclude": ["lm_head"]}, data=data)
            seconds = time.perf_counter() - start
            cells.append(f"{perplexity(pruned, test, seq_len=args.seq_len):.2f}")
            print(f"  {label} {setting}: {cells[-1]} ({seconds:.1f} s)", flush=True)
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
