"""The end of the lottery demo: the winning ticket, compressed, timed and saved.

The winner is the sparsest IMP ticket whose mean accuracy over seeds reaches the dense
network's (else the most accurate ticket); its first seed's network is compressed with
:func:`sparsenets.compress`, timed against its dense form on one batch size, and saved
with :func:`sparsenets.save` beside a dense safetensors file of the same weights.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from ..compression import compress
from ..io import save
from ..masking import finalize_
from ..methods import apply_masks, rewind_
from ..models import build_model
from ..utils import atomic, timing
from .data import load_dataset
from .rundir import RunDir

if TYPE_CHECKING:
    from .recipe import Recipe

BATCH = 1024
REPEATS = 30


def winning_level(results: dict[str, Any]) -> int | None:
    summary = results["summary"]
    dense = next((e["accuracy_mean"] for e in summary if e["arm"] == "dense"), None)
    tickets = [e for e in summary if e["arm"] == "imp"]
    if not tickets:
        return None
    good = [e for e in tickets if dense is not None and e["accuracy_mean"] >= dense]
    best = min(good, key=lambda e: e["remaining"]) if good else max(tickets, key=lambda e: e["accuracy_mean"])
    return best["level"]


def _median_ms(dense: nn.Module, fast: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Median milliseconds of each model on ``x``, in interleaved rounds."""
    with torch.no_grad():
        timings = timing.interleaved({"dense": functools.partial(dense, x), "fast": functools.partial(fast, x)},
                                     rounds=REPEATS, warmup=5, sync=timing.cuda_sync(x))
    ms = timings.median_ms()
    return ms["dense"], ms["fast"]


def compress_winning_ticket(run_dir: RunDir, recipe: Recipe, results: dict[str, Any],
                            console: Console) -> dict[str, Any] | None:
    """Compress, time and save the winning ticket; writes ``compressed.json`` and returns it."""
    level = winning_level(results)
    if level is None:
        return None
    job = next(j for j in results["jobs"] if j["arm"] == "imp" and j["level"] == level)
    data = load_dataset(recipe.data["name"], **recipe.options("data"))
    checkpoint = run_dir.load_checkpoint(job["key"])
    ticket = build_model(recipe.model["name"], data.input_shape, data.num_classes, **recipe.options("model"))
    ticket = rewind_(apply_masks(ticket, checkpoint["masks"]), checkpoint["weights"]).eval()
    dense = finalize_(copy.deepcopy(ticket))
    x = torch.randn(BATCH, *data.input_shape)
    fast = compress(ticket, example_input=x)
    with torch.no_grad():
        error = (fast(x) - dense(x)).abs().max().item()
    dense_ms, fast_ms = _median_ms(dense, fast, x)
    architecture = {"name": recipe.model["name"], "input_shape": list(data.input_shape),
                    "num_classes": data.num_classes, **recipe.options("model")}
    ticket_file = save(fast, run_dir.path / "ticket.safetensors", architecture=architecture,
                       metadata={"job": job["key"], "test_accuracy": job["test_accuracy"]})
    dense_file = run_dir.path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_file))
    info = {
        "job": job["key"], "remaining": job["remaining"], "test_accuracy": job["test_accuracy"],
        "batch": BATCH, "threads": torch.get_num_threads(), "dense_ms": dense_ms, "compressed_ms": fast_ms,
        "speedup": dense_ms / fast_ms, "max_abs_error": error,
        "ticket_bytes": ticket_file.stat().st_size, "dense_bytes": dense_file.stat().st_size,
        "layers": str(fast.compress_report),
    }
    atomic.write_json(run_dir.path / "compressed.json", info)
    console.print(
        f"winning ticket [bold]{job['key']}[/] ({100 * job['remaining']:.1f}% of weights, "
        f"{100 * job['test_accuracy']:.1f}% test accuracy), compressed: "
        f"{info['speedup']:.2f}× the dense speed at batch {BATCH} ({dense_ms:.3f} → {fast_ms:.3f} ms, "
        f"{info['threads']} threads), file {info['ticket_bytes'] / 1024:.0f} KiB vs "
        f"{info['dense_bytes'] / 1024:.0f} KiB dense ({info['ticket_bytes'] / info['dense_bytes']:.2f}×)",
        soft_wrap=True)
    console.print(f"ticket: {ticket_file}   details: {run_dir.path / 'compressed.json'}", soft_wrap=True)
    return info

