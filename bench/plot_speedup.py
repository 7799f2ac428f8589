"""Plot speedup over dense against sparsity from ``sparsenets bench --json FILE``.

    python bench/plot_speedup.py bench.json speedup.png

One panel per (batch, mode); one line per implementation; the dashed line is the ideal
speedup 1/density.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="JSON written by sparsenets bench --json")
    parser.add_argument("output", type=Path, help="image file (.png, .svg, .pdf)")
    args = parser.parse_args()
    rows = json.loads(args.results.read_text())["rows"]

    panels = sorted({(row["batch"], row["mode"]) for row in rows}, key=lambda p: (-p[0], p[1]))
    names = list(dict.fromkeys(n for r in rows for n in r["speedup"] if n != "dense"))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per implementation everywhere
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (batch, mode) in zip(axes[0], panels):
        part = sorted((r for r in rows if r["batch"] == batch and r["mode"] == mode), key=lambda r: r["sparsity"])
        sparsity = [r["sparsity"] for r in part]
        ax.plot(sparsity, [1 / r["density"] for r in part], "k--", lw=1, label="ideal (1/density)")
        for name in names:
            points = [(r["sparsity"], r["speedup"][name]) for r in part if name in r["speedup"]]
            if points:
                ax.plot(*zip(*points), "o-", color=colors[name], label=name)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of blocks removed)")
        ax.set_title(f"batch {batch}, {mode}")
    axes[0][0].set_ylabel("speedup over dense F.linear")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    shape = rows[0]["shape"]
    fig.suptitle(f"Linear {shape[0]}x{shape[1]}, {rows[0]['pattern']}, {rows[0]['threads']} threads")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(args.output, dpi=130)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
