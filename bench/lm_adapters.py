"""Parameter-efficient fine-tuning across a shift of domain: the built-in LM pretrained on the
corpus' English prose only, then adapted to its code samples by full fine-tuning, LoRA (peft)
and MoRe (Monarch Rectangular) adapters on every Linear of the decoder blocks.

Everything is local: the prose model is trained on the train split's prose paragraphs (cached
after the first run, ~4 CPU-minutes); each arm fine-tunes on random windows of the train
split's code paragraphs (seed: adapter initialisation and batch order), then perplexity is
measured on the test split's code (the new domain) and prose (what was forgotten). Learning
rates are per family; ``--tune`` picks them on the validation split, never on test. The
default run (12 trained arms x 3 seeds x 120 steps) takes ~25 minutes on 2 idle cores.

    .venv/bin/python bench/lm_adapters.py --json adapters_lm.json --plot docs/adapters_lm.png
    .venv/bin/python bench/lm_adapters.py --arms "MoRe *"   # some arms only
    .venv/bin/python bench/lm_adapters.py --tune     # lr grid, one seed, validation split
    .venv/bin/python bench/lm_adapters.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from typing import Any

import torch

from sparsenets.experiments.protocols.adapters import adapted  # the recipe protocol runs the same arms
from sparsenets.text import LMConfig, builtin_lm, domain_text, encode, fine_tune, perplexity

LORA_RANKS = (1, 2, 4, 8, 16)
MORE_BLOCKS = (2, 4, 8)
# Chosen by --tune (validation code perplexity, seed 0, default steps; see chosen()).
LR = {"full": 3e-3, "lora": 1e-2, "more": 3e-2}
GRID = {"full": (3e-4, 1e-3, 3e-3, 1e-2), "lora": (3e-3, 1e-2, 3e-2, 1e-1), "more": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}
TUNED = {"full": {}, "lora": {"r": 4}, "more": {"nblocks": 4, "block_rank": 1}}  # the arm each family tunes on
# A 1-layer model that trains in seconds, for tests of this script (hidden --tiny).
TINY = LMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, seq_len=64, batch_size=8, steps=30, lr=1e-2, warmup_steps=5, data="prose")


def arms(more_ranks: list[int]) -> list[tuple[str, str, dict]]:
    """(label, family, adapter shape) of every arm, in table order."""
    return ([("no adaptation", "none", {}), ("full fine-tuning", "full", {})]
            + [(f"LoRA r={r}", "lora", {"r": r}) for r in LORA_RANKS]
            + [(f"MoRe {b}x{k}", "more", {"nblocks": b, "block_rank": k}) for k in more_ranks for b in MORE_BLOCKS])


def run_arm(base: Any, family: str, shape: dict, seed: int, args: argparse.Namespace, lr: float,
            data: dict[str, torch.Tensor]) -> dict:
    model = adapted(base, family, shape, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if family != "none" else 0
    start = time.perf_counter()
    if family != "none":
        fine_tune(model, data["train"], steps=args.steps, lr=lr, seq_len=args.seq_len, batch_size=args.batch_size,
                  warmup_steps=max(1, args.steps // 10), seed=seed)
    seconds = time.perf_counter() - start
    ppl = {kind: perplexity(model, data[kind], seq_len=args.seq_len, max_windows=args.max_windows)
           for kind in ("code", "prose")}
    return {"trainable": trainable, "seconds": seconds, **ppl}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {"full fine-tuning": [r for r in rows if r["family"] == "full"],
             "LoRA r=1..16": [r for r in rows if r["family"] == "lora"]}
    for blocks in MORE_BLOCKS:  # a line per block count, across block ranks (MoRe r costs what LoRA r does)
        lines[f"MoRe {blocks} blocks"] = [r for r in rows if r["family"] == "more" and r["shape"]["nblocks"] == blocks]
    for i, (label, mine) in enumerate(lines.items()):
        if not mine:
            continue
        x = [r["trainable"] * (1 + 0.04 * (i - 2) * (r["family"] == "more")) for r in mine]  # nudge: no overlap
        y = [statistics.mean(r["code"]) for r in mine]
        err = [statistics.stdev(r["code"]) if len(r["code"]) > 1 else 0.0 for r in mine]
        fmt = {"full": "*", "LoRA": "o-"}.get(label.split()[0], "s--")
        ax.errorbar(x, y, yerr=err, fmt=fmt, capsize=3, markersize=9 if fmt == "*" else 5, label=label)
    for r in rows:
        if r["family"] == "none":
            ax.axhline(statistics.mean(r["code"]), color="grey", linestyle="--", label="no adaptation")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("code perplexity (test)")
    ax.set_title("Adapting a prose-pretrained LM to code")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--more-ranks", type=int, nargs="+", default=[1, 2], help="MoRe block ranks")
    for family, lr in LR.items():
        parser.add_argument(f"--lr-{family}", type=float, default=lr, help=f"learning rate of {family} arms")
    parser.add_argument("--arms", nargs="+", metavar="GLOB", help="only the arms whose label matches, e.g. 'MoRe *'")
    parser.add_argument("--tune", action="store_true", help="lr grid per family on the validation split")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, a few windows: a smoke test")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write code perplexity vs trainable parameters here (png)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = TINY if args.tiny else LMConfig(data="prose")
    args.seq_len, args.max_windows = config.seq_len, None
    if args.quick:
        args.steps, args.seeds, args.max_windows, args.more_ranks = 4, args.seeds[:1], 4, args.more_ranks[:1]
    base, tokenizer = builtin_lm(config=config, progress=not args.tiny)
    split = "validation" if args.tune else "test"
    data = {"train": encode(domain_text("train", "code"), tokenizer),
            "code": encode(domain_text(split, "code"), tokenizer),
            "prose": encode(domain_text(split, "prose"), tokenizer)}
    total = sum(p.numel() for p in base.parameters())
    print(f"prose-pretrained LM: {total:,} parameters; fine-tuning on {data['train'].numel():,} code tokens, "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len}; {split} split: {data['code'].numel():,} code "
          f"and {data['prose'].numel():,} prose tokens\n", flush=True)
    if args.tune:
        return tune(base, args, data)
    lrs = {family: getattr(args, f"lr_{family}") for family in LR}
    rows = []
    for label, family, shape in arms(args.more_ranks):
        if args.arms and not any(fnmatch.fnmatchcase(label, glob) for glob in args.arms):
            continue
        seeds = args.seeds if family != "none" else []  # no adaptation: nothing random, one evaluation
        results = [run_arm(base, family, shape, seed, args, lrs.get(family, 0.0), data) for seed in seeds or [0]]
        row = {"arm": label, "family": family, "shape": shape, "lr": lrs.get(family), "seeds": seeds,
               "trainable": results[0]["trainable"], "percent": 100 * results[0]["trainable"] / total,
               "code": [r["code"] for r in results], "prose": [r["prose"] for r in results],
               "seconds": statistics.mean(r["seconds"] for r in results)}
        rows.append(row)
        print(f"  {label}: code {mean_std(row['code'])}, prose {mean_std(row['prose'])} "
              f"({row['seconds']:.0f} s per run)", flush=True)
    table = [f"| arm | trainable params | % of model | code perplexity ({split}) | prose perplexity ({split}) |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {r['arm']} | {r['trainable']:,} | {r['percent']:.2f} | {mean_std(r['code'])} | "
              f"{mean_std(r['prose'])} |" for r in rows]
    print("\n" + "\n".join(table))
    print(f"\nmean ± std over seeds {args.seeds}; lr: " + ", ".join(f"{f} {lr:g}" for f, lr in lrs.items()))
    out = {"settings": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                        "seeds": args.seeds, "lr": lrs, "split": split, "parameters": total}, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return out


def chosen(scores: dict[float, float]) -> float:
    """The smallest lr within 0.5% of the best validation perplexity: near-ties are noise, and a
    smaller lr is safer on the family's other arms (LoRA's update grows with its rank at alpha = r)."""
    best = min(scores.values())
    return min(lr for lr, p in scores.items() if p <= 1.005 * best)


def tune(base: Any, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict:
    """Validation perplexity of each family's representative arm at each lr of its grid (seed 0)."""
    found: dict[str, dict[float, float]] = {}
    for family, grid in GRID.items():
        found[family] = {}
        for lr in grid:
            found[family][lr] = run_arm(base, family, TUNED[family], args.seeds[0], args, lr, data)["code"]
            print(f"  {family} {TUNED[family]} lr {lr:g}: validation code perplexity {found[family][lr]:.3f}",
                  flush=True)
    lrs = sorted({lr for grid in GRID.values() for lr in grid})
    print("\n| family (arm) | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |")
    print("|---|" + "---:|" * len(lrs) + "---|")
    for family, scores in found.items():
        print(f"| {family} {TUNED[family]} | " + " | ".join(f"{scores[lr]:.3f}" if lr in scores else "" for lr in lrs)
              + f" | {chosen(scores):g} |")
    return {"tune": {f: {str(lr): p for lr, p in s.items()} for f, s in found.items()}}


if __name__ == "__main__":
    main()
