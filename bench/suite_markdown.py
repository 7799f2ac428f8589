"""Print a ``sparsenets bench --suite --json FILE`` result as a Markdown table (as in the README).

    python bench/suite_markdown.py suite.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODE = {"forward": "fwd", "forward+backward": "fwd+bwd"}


def markdown(result: dict) -> str:
    lines = ["| kernel | case | batch | mode | dense ms | sparsenets ms | speedup | goal | beside it |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        goal = row["goal"]
        mark = "" if goal is None else (" ✓" if row["speedup"] >= goal else " ✗")
        peers = ", ".join(f"{name} {speed:.2f}×" for name, speed in row["peers"].items())
        lines.append(f"| {row['kind']} | {row['case']} | {row['batch']} | {MODE.get(row['mode'], row['mode'])} "
                     f"| {row['dense_ms']:.3g} | {row['sparsenets_ms']:.3g} | **{row['speedup']:.2f}×**{mark} "
                     f"| {'–' if goal is None else f'≥ {goal:g}×'} | {peers} |")
    machine = result["machine"]
    lines.append("")
    lines.append(f"{machine['cpu']} ({machine['cores']} cores), {machine['threads']} threads, torch "
                 f"{machine['torch']}; {machine['kernels']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="the file sparsenets bench --suite --json wrote")
    path = parser.parse_args().json
    try:
        result = json.loads(path.read_text())
        print(markdown(result))
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"{path} is not a result of sparsenets bench --suite --json ({type(err).__name__}: {err})")


if __name__ == "__main__":
    main()
