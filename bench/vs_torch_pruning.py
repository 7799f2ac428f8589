"""Structural pruning side by side: Torch-Pruning against sparsenets, same models, same ratio, no fine-tuning.

Two models, each pruned from the same random weights by both tools:

* ``resnet``: a ResNet-18-style network for 3x32x32 inputs (basic blocks, 1x1 conv + BatchNorm
  downsample shortcuts), 50 % of the channels of every coupled group. Torch-Pruning:
  ``MagnitudePruner`` (L2 group magnitude, ``global_pruning=False``, classifier ignored).
  sparsenets: L1 channel magnitude on each block's first conv (``pattern: channel``, its BatchNorm's
  scale and shift masked with each pruned row), and each
  residual stream from ``channel_groups`` zeroed on its lowest-L1 channels (the sum over the
  stream's writers of each row's mean |w|), then ``compress``.
* ``llama``: a Llama-style decoder (hidden 256, intermediate 1024, 4 layers, 8 heads, 4 key/value
  heads, vocabulary 8192, sequences of 128), 50 % of the MLP channels; ``llama-heads``: the same
  and 50 % of the attention heads.
  Torch-Pruning: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, only the MLP (and q/k/v)
  layers as roots. sparsenets: L1 channel magnitude on ``up_proj`` rows, ``pattern: head``
  (whole key/value groups), then ``compress``.

For each: parameters removed, median CPU latency of interleaved rounds (``sparsenets.utils.timing``)
at ``--batch``, relative L2 error and max |Δ| of the logits against the unpruned model, and the time
taken to prune (for the sparsenets ResNet also max |Δ| of the compressed model against the masked one).
Prints a markdown table (and writes ``--json``). A tool that fails on a model, or takes more than ``--limit``
seconds to prune it, gets its error in the table.

    python bench/vs_torch_pruning.py [--threads 1] [--batch 8] [--models resnet llama llama-heads] [--limit 300]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from cnn import ResNet  # bench/cnn.py, beside this script
from torch import nn

import sparsenets as sn
from sparsenets.compression.graph import channel_groups
from sparsenets.utils import timing

# ---- models ---------------------------------------------------------------------------------------


def resnet(batch: int) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    model = ResNet(widths=(64, 128, 256, 512), classes=10)  # ResNet-18 for 32x32 inputs
    with torch.no_grad():  # BatchNorm statistics from a few batches, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model.train()
        for _ in range(4):
            model(torch.randn(32, 3, 32, 32))
    return model.eval(), lambda: torch.randn(batch, 3, 32, 32)


LLAMA = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
SEQ = 128


def llama(batch: int) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return model.eval(), lambda: torch.randint(0, LLAMA["vocab_size"], (batch, SEQ))


MODELS = {"resnet": resnet, "llama": llama, "llama-heads": llama}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- Torch-Pruning -----------------------------------------------------------------------------


def tp_resnet(model: nn.Module, example: torch.Tensor, ratio: float, heads: bool) -> nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=False, ignored_layers=[model.fc])
    pruner.step()
    return model


def tp_llama(model: nn.Module, example: torch.Tensor, ratio: float, heads: bool) -> nn.Module:
    """Only the MLP's up/gate projections (and with ``heads`` q/k/v) root a group: the residual
    stream (hidden size) stays, as it does for sparsenets here."""
    import torch_pruning as tp

    roots: set[nn.Module] = set()
    num_heads: dict[nn.Module, int] = {}
    for layer in model.model.layers:
        roots |= {layer.mlp.gate_proj, layer.mlp.up_proj}
        if heads:
            attn = layer.self_attn
            roots |= {attn.q_proj, attn.k_proj, attn.v_proj}
            num_heads[attn.q_proj] = model.config.num_attention_heads
            num_heads[attn.k_proj] = num_heads[attn.v_proj] = model.config.num_key_value_heads
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m not in roots]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored,
        num_heads=num_heads, prune_num_heads=heads, prune_head_dims=False, head_pruning_ratio=ratio if heads else 0.0,
        output_transform=lambda out: out.logits)  # the default trace needs a tensor, not a ModelOutput
    pruner.step()
    if heads:  # tell the attention modules their new shapes, as Torch-Pruning's LLM example does
        for layer in model.model.layers:
            attn = layer.self_attn
            q, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
            attn.num_key_value_groups = q // kv
            for name in ("num_heads", "num_attention_heads"):
                if hasattr(attn, name):
                    setattr(attn, name, q)
            for name in ("num_key_value_heads",):
                if hasattr(attn, name):
                    setattr(attn, name, kv)
        model.config.num_attention_heads = q
        model.config.num_key_value_heads = kv
    model.config.intermediate_size = model.model.layers[0].mlp.up_proj.out_features
    return model


# ---- sparsenets ------------------------------------------------------------------------------------


def sn_resnet(model: nn.Module, example: torch.Tensor, ratio: float, heads: bool) -> nn.Module:
    # the batch lets sparsify_ trace the model: each conv1 unit takes its bn1 along (scale and shift
    # masked with the row), so a pruned inner channel is exactly zero and compress cuts all of them
    sn.sparsify_(model, {"pattern": "channel", "sparsity": ratio, "include": ["layers.*.*.conv1"]}, data=[example])
    sn.masking.finalize_(model)
    for group in channel_groups(model, example):
        score = torch.zeros(group.width)
        for name in group.writers:
            weight = model.get_submodule(name).weight.detach()
            score += weight.abs().flatten(1).mean(1)
        group.zero_(model, torch.argsort(score)[: int(ratio * group.width)])
    small = sn.compress(model.eval(), example, autotune=False)
    with torch.no_grad():  # exactness: the compressed model against the zeroed one it came from
        small.masked_delta = float((small(example) - model(example)).abs().max())  # type: ignore[assignment]
    return small


def sn_llama(model: nn.Module, example: torch.Tensor, ratio: float, heads: bool) -> nn.Module:
    sn.sparsify_(model, {"pattern": "channel", "sparsity": ratio, "include": ["*mlp.up_proj"]})
    if heads:
        sn.sparsify_(model, {"pattern": "head", "sparsity": ratio, "include": ["*self_attn"]})
    return sn.compress(model.eval(), example, autotune=False)


PRUNERS = {"resnet": {"torch-pruning": tp_resnet, "sparsenets": sn_resnet},
           "llama": {"torch-pruning": tp_llama, "sparsenets": sn_llama},
           "llama-heads": {"torch-pruning": tp_llama, "sparsenets": sn_llama}}
RULES = {
    ("resnet", "torch-pruning"): "L2 of each coupled group (all layers it touches, BN too), mean over the group",
    ("resnet", "sparsenets"): "L1 (mean |w|) of conv1 rows; streams: sum over writers of each row's mean |w|",
    ("llama", "torch-pruning"): "L2 over the group (gate+up rows, down columns), mean over the group",
    ("llama", "sparsenets"): "L1 (mean |w|) of up_proj rows",
    ("llama-heads", "torch-pruning"): "MLP as above; heads: L2 per query head, within each k/v group",
    ("llama-heads", "sparsenets"): "MLP as above; heads: mean |w| of each whole k/v group (q, k, v rows, o columns)",
}


# ---- measuring ---------------------------------------------------------------------------------------


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM: POSIX only)."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"did not finish pruning within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(name: str, args) -> list[dict]:
    base, make_input = MODELS[name](args.batch)
    example, test = make_input(), make_input()
    with torch.no_grad():
        reference = logits(base, test)
    total = n_params(base)
    rows, timed = [], {"dense": base}
    for tool, prune in PRUNERS[name].items():
        model = copy.deepcopy(base)
        row = {"model": name, "tool": tool, "rule": RULES[name, tool], "params": total}
        start = time.perf_counter()
        try:
            with time_limit(args.limit):
                pruned = prune(model, example, args.ratio, name == "llama-heads")
            row["prune_s"] = time.perf_counter() - start
            with torch.no_grad():
                out = logits(pruned, test)
            row["removed"] = 1 - n_params(pruned) / total
            row["error"] = float((out - reference).norm() / reference.norm())
            row["max_delta"] = float((out - reference).abs().max())
            if hasattr(pruned, "masked_delta"):
                row["masked_delta"] = pruned.masked_delta
            timed[tool] = pruned
        except Exception as error:  # noqa: BLE001 - a tool failing on a model is a result
            row["error_text"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
    with torch.no_grad():
        found = timing.interleaved({k: functools.partial(logits, m, test) for k, m in timed.items()},
                                   rounds=args.rounds * 20, min_rounds=args.rounds, budget_s=args.seconds)
    ms = found.median_ms()
    for row in rows:
        row["dense_ms"] = ms["dense"]
        if row["tool"] in ms:
            row["ms"] = ms[row["tool"]]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | params removed | latency ms (dense) | speedup | logit rel. L2 error | max \\|Δ\\| "
             "| prune s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error_text" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: `{r['error_text']}` | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {100 * r['removed']:.1f} % of {r['params'] / 1e6:.2f} M | "
                     f"{r['ms']:.1f} ({r['dense_ms']:.1f}) | {r['dense_ms'] / r['ms']:.2f}x | {r['error']:.3f} | "
                     f"{r['max_delta']:.3g} | {r['prune_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="batch size for timing and error (default 8)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels (and heads) to prune")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--limit", type=float, default=300.0,
                        help="seconds one tool may take to prune one model before it counts as failed")
    parser.add_argument("--rounds", type=int, default=10, help="at least this many timed rounds")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per model for timing")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # sparsenets says which weights a config leaves dense, Torch-Pruning which norm weights it found
    # unwrapped: both on purpose here
    warnings.filterwarnings("ignore", message=".*this config leaves dense", category=UserWarning)
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
    rows = [row for name in args.models for row in run_model(name, args)]
    print(table(rows))
    print()
    for r in rows:
        print(f"- {r['model']} / {r['tool']}: {r['rule']}")
    for r in rows:
        if "masked_delta" in r:
            print(f"- {r['model']} / {r['tool']}: compressed against masked, max |Δ| {r['masked_delta']:.2g}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
