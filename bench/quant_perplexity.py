"""Perplexity of the built-in LM with quantized weights: round-to-nearest against GPTQ at 8, 4,
3 and 2 bits (one scale per output channel, and per group of 32 inputs; GPTQ in input order and
in act-order), and 50% / 2:4 pruning with 4- and 3-bit weights, jointly (SparseGPT + GPTQ in one
sweep) against prune-then-round.

The GPTQ paper's ordering to check: 4 bits costs RTN a little and GPTQ less; at 3 bits RTN
collapses while GPTQ holds. The model is trained locally on the corpus that ships with sparsenets
(cached after the first run), once per seed (``--seeds``: each cell is the mean ± standard
deviation over the models); calibration windows come from its train split, perplexity from its
test split.

    .venv/bin/python bench/quant_perplexity.py                  # the full table, 3 seeds
    .venv/bin/python bench/quant_perplexity.py --seeds 0 --quick  # one model, fewer windows
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import sparsenets as sn
from sparsenets.quant import quantize_
from sparsenets.text import LMConfig, builtin_lm, calibration_batches, corpus_text, encode, perplexity

BITS = (8, 4, 3, 2)
GROUPS = {"channel": None, "g32": 32}
METHODS = {"RTN": {"method": "rtn"}, "GPTQ": {"method": "gptq"},
           "GPTQ act-order": {"method": "gptq", "act_order": True}}
SPARSE = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
JOINT_WEIGHTS = {"int4 g32": {"bits": 4, "group_size": 32}, "int3 channel": {"bits": 3, "group_size": None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=None, help="test windows (default: the whole split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the LM")
    parser.add_argument("--quick", action="store_true", help="16 calibration windows, 32 test windows")
    args = parser.parse_args()
    if args.quick:
        args.calibration, args.test_windows = 16, args.test_windows or 32
    cells: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        for key, value in evaluate(seed, args).items():
            cells.setdefault(key, []).append(value)

    def cell(row: str, column: str) -> str:
        values = cells[(row, column)]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"

    rows = ["fp32"] + [f"int{bits} {name}" for bits in BITS for name in GROUPS]
    table = ["| weights | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    table += [f"| {row} | " + " | ".join(cell(row, column) for column in METHODS) + " |" for row in rows]
    joint_columns = ("pruned only", "prune, then RTN", "joint")
    joint = ["| pruning | weights | pruned only (SparseGPT, fp32) | prune, then RTN | SparseGPT + GPTQ, joint |",
             "|---|---|---:|---:|---:|"]
    joint += [f"| {name} | {label} | " + " | ".join(cell(f"{name} {label}", c) for c in joint_columns) + " |"
              for name in SPARSE for label in JOINT_WEIGHTS]
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}: mean ± standard deviation\n")
    print("\n".join(table) + "\n\n" + "\n".join(joint))


def evaluate(seed: int, args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """Every cell of both tables for the LM trained with ``seed``, keyed by (row, column)."""
    model, tokenizer = builtin_lm(config=LMConfig(seed=seed), progress=True)
    train, test = encode(corpus_text("train"), tokenizer), encode(corpus_text("test"), tokenizer)
    data = calibration_batches(train, args.calibration, args.seq_len)

    def run(label: str, sparsify: dict | None, quant: dict | None) -> float:
        m = copy.deepcopy(model)
        start = time.perf_counter()
        if sparsify is not None:  # zeros written into the weights, no masks: quantize_ keeps them zero
            sn.sparsify_(m, {"criterion": "sparsegpt", "exclude": ["lm_head"], **sparsify}, data=data, masks=False)
        if quant is not None:
            quantize_(m, quant, data=data)
        seconds = time.perf_counter() - start
        value = perplexity(m, test, seq_len=args.seq_len, max_windows=args.test_windows)
        print(f"  {label}: {value:.2f} ({seconds:.1f} s)", flush=True)
        return value

    dense = run("fp32", None, None)
    cells = {("fp32", column): dense for column in METHODS}
    for bits in BITS:
        for name, group in GROUPS.items():
            for column, method in METHODS.items():
                cells[(f"int{bits} {name}", column)] = run(f"{column} {bits}-bit {name}", None,
                                                           {"bits": bits, "group_size": group, **method})
    for name, setting in SPARSE.items():
        pruned = run(f"{name} pruned", setting, None)
        for label, quant in JOINT_WEIGHTS.items():
            row = f"{name} {label}"
            cells[(row, "pruned only")] = pruned
            cells[(row, "prune, then RTN")] = run(f"{name} prune then rtn {label}", setting, {**quant, "method": "rtn"})
            cells[(row, "joint")] = run(f"{name} joint gptq {label}", None, {**quant, **setting, "method": "gptq"})
    return cells


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
