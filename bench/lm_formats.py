"""One-shot compression of the built-in LM at equal parameter counts: low-rank (SVD and
Fisher-weighted SVD, as LoRD / FWSVD), Monarch, and pruning (unstructured, blocks, N:M).

Every Linear of the decoder blocks is compressed (lm_head and the embeddings are not); a
budget is the fraction of those layers' weights kept: factors for the structured formats,
non-zeros for pruning (sparsity 1 - budget). Fisher information and pruning calibration use
random windows of the train split; perplexity is on the test split. ``--heal STEPS``
fine-tunes every compressed model on the train split (all its parameters; pruning masks
stay, so pruned weights stay zero) and measures again.

Sparse formats also store where the kept weights are; the table's "index bits" column is that
cost per kept weight (a bitmap for unstructured, one bit per 8x8 block, the 2-bit position
inside each group of 4 for N:M); low-rank and Monarch factors need none.

    .venv/bin/python bench/lm_formats.py --plot docs/formats_lm.png --json formats_lm.json
    .venv/bin/python bench/lm_formats.py --heal 200
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Any

import torch
from torch import nn

import sparsenets as sn
from sparsenets.text import LMConfig, builtin_lm, calibration_batches, corpus_text, encode, fine_tune, perplexity

BUDGETS = (0.75, 0.5, 0.25)
NM = {0.75: "3:4", 0.5: "2:4", 0.25: "1:4"}
EXCLUDE = ["lm_head"]
# label -> (kind, settings, index bits per kept weight as a function of the budget)
METHODS: dict[str, tuple[str, dict, Any]] = {
    "low-rank SVD": ("factorize", {"format": "low-rank", "method": "svd"}, lambda b: 0),
    "low-rank Fisher SVD": ("factorize", {"format": "low-rank", "method": "fisher"}, lambda b: 0),
    "low-rank Fisher SVD + energy": ("factorize", {"format": "low-rank", "method": "fisher", "allocation": "energy"},
                                     lambda b: 0),
    "low-rank Fisher SVD + sensitivity": ("factorize", {"format": "low-rank", "method": "fisher",
                                                        "allocation": "sensitivity"}, lambda b: 0),
    "Monarch (4 blocks)": ("factorize", {"format": "monarch", "nblocks": 4, "method": "svd"}, lambda b: 0),
    # 4 blocks of full rank keep only half of a square layer: 2 blocks reach the larger budgets
    "Monarch (2 blocks)": ("factorize", {"format": "monarch", "nblocks": 2, "method": "svd"}, lambda b: 0),
    "unstructured magnitude": ("sparsify", {"criterion": "magnitude"}, lambda b: 1 / b),
    "unstructured SparseGPT": ("sparsify", {"criterion": "sparsegpt"}, lambda b: 1 / b),
    "block 8x8 magnitude": ("sparsify", {"criterion": "magnitude", "pattern": "block:8x8"}, lambda b: 1 / (64 * b)),
    "N:M SparseGPT": ("sparsify", {"criterion": "sparsegpt", "pattern": "N:M"}, lambda b: 2),
}
TINY = LMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, seq_len=64, batch_size=8, steps=30, lr=1e-2, warmup_steps=5)


def kept(model: nn.Module) -> int:
    """Weights the targeted layers store: non-zeros of a (masked) Linear, all factors of a structured one."""
    total = 0
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        if isinstance(module, nn.Linear):
            total += int(torch.count_nonzero(module.weight))
        elif hasattr(module, "dense_weight") and hasattr(module, "num_parameters"):
            total += int(module.num_parameters())
    return total


def compress(model: nn.Module, kind: str, settings: dict, budget: float, data: dict[str, list],
             fisher_batches: int | None = None) -> None:
    """Compress the targeted layers in place, keeping ``budget`` of their weights."""
    if kind == "factorize":
        from sparsenets.formats.factorize import FactorizeConfig, factorize_

        config = FactorizeConfig(**settings, budget=budget, exclude=EXCLUDE, batches=fisher_batches)
        factorize_(model, config, data=data["fisher"] if config.method == "fisher" else None)
        return
    config = {**settings, "exclude": EXCLUDE}
    if config.get("pattern") == "N:M":
        config["pattern"] = NM[budget]
    else:
        config["sparsity"] = 1 - budget
    with warnings.catch_warnings():  # lm_head and the embeddings stay dense by design: no need to say so
        warnings.filterwarnings("ignore", message=".*of the parameters are weights this config leaves dense")
        sn.sparsify_(model, config, data=data["calibration"])


def plot(results: dict, dense: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    healed = False
    for i, (label, cells) in enumerate(results.items()):
        color = f"C{i % 10}"
        points = sorted(((c["kept"], c["ppl"], c.get("healed")) for c in cells.values()), key=lambda p: p[:2])
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=label)
        cured = [p for p in points if p[2] is not None]  # healed runs may cover only some budgets
        if cured:
            healed = True
            ax.plot([p[0] for p in cured], [p[2] for p in cured], "o--", color=color, alpha=0.6)
    ax.axhline(dense, color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the decoder blocks' weights kept")
    ax.set_ylabel("test perplexity" + (" (dashed: after healing)" if healed else ""))
    ax.set_title("Compressing the built-in LM: structured formats vs pruning")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), choices=BUDGETS,
                        help="fractions of the targeted weights kept")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows (pruning and Fisher)")
    parser.add_argument("--fisher-batches", type=int, default=32,
                        help="of those, the windows Fisher information uses (a backward pass each)")
    parser.add_argument("--heal", type=int, default=0, metavar="STEPS", help="fine-tune each compressed model")
    parser.add_argument("--heal-lr", type=float, default=3e-4, help="peak lr of healing (untuned)")
    parser.add_argument("--quick", action="store_true", help="one budget, a few windows: a smoke test")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write perplexity vs parameters kept here (png)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = TINY if args.tiny else LMConfig()
    max_windows = None
    if args.quick:
        args.budgets, args.calibration, args.heal, max_windows = [0.5], 4, min(args.heal, 4), 4
    model, tokenizer = builtin_lm(config=config, progress=not args.tiny)
    train, test = encode(corpus_text("train"), tokenizer), encode(corpus_text("test"), tokenizer)
    windows = calibration_batches(train, args.calibration, config.seq_len)
    # FWSVD's row Fisher comes from the model's own loss: the batches carry their labels
    data = {"calibration": windows, "fisher": [{**w, "labels": w["input_ids"]} for w in windows]}

    def evaluate(m: nn.Module) -> float:
        return perplexity(m, test, seq_len=config.seq_len, max_windows=max_windows)

    dense, dense_kept = evaluate(model), kept(model)
    print(f"built-in LM: {sum(p.numel() for p in model.parameters()):,} parameters, {dense_kept:,} in the "
          f"decoder blocks' Linear layers; dense test perplexity {dense:.3f}; {args.calibration} calibration "
          f"windows ({args.fisher_batches} for Fisher)"
          + (f"; healing: {args.heal} steps, lr {args.heal_lr:g}" if args.heal else "") + "\n", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for label, (kind, settings, bits) in METHODS.items():
        results[label] = {}
        for budget in args.budgets:
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            compress(compressed, kind, settings, budget, data, args.fisher_batches)
            cell = {"kept": kept(compressed) / dense_kept, "ppl": evaluate(compressed),
                    "seconds": time.perf_counter() - start, "index_bits": bits(budget)}
            if args.heal:
                for p in compressed.parameters():
                    p.requires_grad_(True)
                fine_tune(compressed, train, steps=args.heal, lr=args.heal_lr, seq_len=config.seq_len,
                          batch_size=config.batch_size, warmup_steps=max(1, args.heal // 10))
                cell["healed"], cell["healed_kept"] = evaluate(compressed), kept(compressed) / dense_kept
            results[label][str(budget)] = cell
            print(f"  {label} @ {budget}: kept {cell['kept']:.3f}, perplexity {cell['ppl']:.3f}"
                  + (f", healed {cell['healed']:.3f}" if args.heal else "") + f" ({cell['seconds']:.1f} s)",
                  flush=True)
    tables = [("one-shot", "ppl")] + ([(f"healed ({args.heal} steps)", "healed")] if args.heal else [])
    for title, key in tables:
        head = " | ".join(f"{b:g} kept" for b in args.budgets)
        lines = [f"\n{title}: test perplexity (dense {dense:.3f}); kept = measured fraction of the targeted weights",
                 f"| format | {head} | index bits / kept weight |", "|---|" + "---:|" * len(args.budgets) + "---:|"]
        for label, cells in results.items():
            row = " | ".join(f"{c[key]:.2f} ({c['kept']:.2f})" for c in cells.values())
            index = ", ".join(sorted({f"{c['index_bits']:.2g}" for c in cells.values()}, key=float))
            lines.append(f"| {label} | {row} | {index} |")
        print("\n".join(lines))
    out = {"settings": {"budgets": args.budgets, "calibration": args.calibration, "heal": args.heal,
                        "heal_lr": args.heal_lr, "dense": dense, "targeted_weights": dense_kept}, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot(results, dense, args.plot)
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
