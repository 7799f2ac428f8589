"""Structured pruning per model family: what ``compress`` removes, and what it gains on the CPU.

Each family is built from a small config (transformers: hidden 256, MLP 1024, 4 layers, 8 heads;
no downloads), pruned at 50% with the structures it supports (attention heads or key/value
groups, MLP channels, MoE experts, CNN residual-stream and inner channels; magnitude criterion),
and compressed. For each: parameters before and after, median CPU latency of the masked model
(masks baked in) and of the compressed one (batch 8, eval, no_grad, interleaved rounds of
``sparsenets.utils.timing``), and the largest absolute difference between their outputs.
Prints a markdown table.

    python bench/model_families.py [--threads 1] [--budget 8] [--only llama,resnet] [--json families.json]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from cnn import BasicBlock, InvertedResidual, MobileNet, ResNet, trained_batchnorm  # bench/cnn.py, beside this script
from torch import nn

import sparsenets as sn
from sparsenets.compression.graph import channel_groups
from sparsenets.utils import atomic, timing

transformers.logging.set_verbosity_error()

BATCH, SEQ, VOCAB, SPARSITY = 8, 64, 1000, 0.5
GQA = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=128)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _tokens() -> dict:
    return {"input_ids": _ids()}


# ---- convolutional networks (bench/cnn.py) --------------------------------------------------------


def _lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    return scores.argsort()[: int(fraction * scores.numel())]


def _prune_cnn(model: nn.Module, example: torch.Tensor, inner: list[tuple[str, ...]]) -> list[str]:
    """Residual streams: zero the 50% of each stream's channels whose BatchNorm scales (summed over
    the stream's BatchNorms) are smallest. Inner channels: zero, per block, the 50% with the
    smallest BatchNorm scale in every conv of the chain (``conv, bn, [depthwise, bn2]``)."""
    done = []
    for group in channel_groups(model, example):
        norms = [model.get_submodule(n) for n in group.through]
        scores = sum(m.weight.detach().abs() for m in norms if isinstance(m, nn.BatchNorm2d))
        group.zero_(model, _lowest(scores, SPARSITY))
        done.append(f"stream {group.width}")
    with torch.no_grad():
        for chain in inner:
            index = _lowest(model.get_submodule(chain[1]).weight.abs(), SPARSITY)
            for name in chain:
                for tensor in (getattr(model.get_submodule(name), "weight", None),
                               getattr(model.get_submodule(name), "bias", None)):
                    if isinstance(tensor, torch.Tensor):
                        tensor.index_fill_(0, index, 0)
    return done


# ---- the families -----------------------------------------------------------------------------------


class Family:
    def __init__(self, name: str, build: Callable[[], nn.Module], example: Callable[[], Any], *,
                 heads: bool = True, mlp: list[str] | None = None, experts: bool = False,
                 cnn_inner: Callable[[nn.Module], list[tuple[str, ...]]] | None = None, note: str = "") -> None:
        self.name, self.build, self.example = name, build, example
        self.heads, self.mlp, self.experts, self.cnn_inner, self.note = heads, mlp, experts, cnn_inner, note


def _t5() -> nn.Module:
    return transformers.T5Model(transformers.T5Config(
        vocab_size=VOCAB, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8, decoder_start_token_id=0))


def _resnet_inner(model: nn.Module) -> list[tuple[str, ...]]:
    return [(f"{n}.conv1", f"{n}.bn1") for n, m in model.named_modules() if isinstance(m, BasicBlock)]


def _mobilenet_inner(model: nn.Module) -> list[tuple[str, ...]]:
    return [(f"{n}.expand", f"{n}.bn1", f"{n}.depthwise", f"{n}.bn2")
            for n, m in model.named_modules() if isinstance(m, InvertedResidual)]


FAMILIES = [
    Family("Llama (GQA 8/4)", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**GQA)), _tokens,
           mlp=["*mlp.*"]),
    Family("Mistral (GQA 8/4)", lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**GQA)), _tokens,
           mlp=["*mlp.*"]),
    Family("Qwen2 (GQA 8/4)", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**GQA)), _tokens,
           mlp=["*mlp.*"]),
    Family("OPT", lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
        word_embed_proj_dim=256, max_position_embeddings=128)), _tokens, mlp=["*fc1", "*fc2"]),
    Family("T5 (relu)", _t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(1)},
           mlp=["*DenseReluDense.*"]),
    Family("ViT", lambda: transformers.ViTModel(transformers.ViTConfig(
        image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        intermediate_size=1024), add_pooling_layer=False),
           lambda: {"pixel_values": torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(0))},
           mlp=["*mlp.fc1", "*mlp.fc2"]),
    Family("DistilBERT", lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=256, hidden_dim=1024, n_layers=4, n_heads=8, max_position_embeddings=128)), _tokens,
           mlp=["*ffn.lin1", "*ffn.lin2"]),
    Family("BERT", lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
        max_position_embeddings=128), add_pooling_layer=False), _tokens,
           mlp=["*intermediate.dense", "*[0-9].output.dense"]),
    Family("GPT-2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8, n_inner=1024, n_positions=128)), _tokens,
           mlp=["*mlp.c_fc", "*mlp.c_proj"]),
    Family("Mixtral (8 experts, top-2)", lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{**GQA, "intermediate_size": 512}, num_local_experts=8, num_experts_per_tok=2)), _tokens, experts=True),
    Family("ResNet (downsample shortcuts)", ResNet,
           lambda: torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
           heads=False, cnn_inner=_resnet_inner),
    Family("MobileNet-style (inverted residuals)", MobileNet,
           lambda: torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
           heads=False, cnn_inner=_mobilenet_inner),
]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _output(model: nn.Module, example: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _call(model: nn.Module, example: Any) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(**example) if isinstance(example, dict) else model(example)
    return run


def measure(family: Family, budget_s: float) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = family.build().eval()
    example = family.example()
    params_dense = _n_params(model)
    structures = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*this config leaves dense")
        if family.heads:
            sn.sparsify_(model, {"pattern": "head", "sparsity": SPARSITY})
            structures.append("heads")
        if family.mlp:
            sn.sparsify_(model, {"pattern": "channel", "sparsity": SPARSITY, "include": family.mlp})
            structures.append("MLP channels")
    if family.cnn_inner:
        trained_batchnorm(model)
        streams = _prune_cnn(model, example, family.cnn_inner(model))
        structures.append(f"residual streams ({len(streams)}) + inner channels")
    reference = None
    if family.experts:
        reference = sn.finalize_(copy.deepcopy(model))  # every expert, for the latency before
        sn.prune_experts_(model, SPARSITY, by="magnitude")
        structures.append("experts")
    masked = sn.finalize_(copy.deepcopy(model)).eval()
    compressed = sn.compress(model.eval(), example, autotune=False)
    report = compressed.compress_report
    delta = float((_output(compressed, example) - _output(masked, example)).abs().max())
    scale = float(_output(masked, example).abs().max())
    before = reference if reference is not None else masked
    # expert removal reroutes tokens: its own change of the outputs, apart from compress's
    routed = None if reference is None else float((_output(reference, example) - _output(masked, example)).abs().max())
    timings = timing.interleaved({"before": _call(before, example), "after": _call(compressed, example)},
                                 rounds=200, min_rounds=10, warmup=2, budget_s=budget_s)
    median = timings.median_ms()
    ratios = timings.ratios("before", "after")
    return {
        "family": family.name, "structures": structures, "params_before": params_dense,
        "params_after": _n_params(compressed), "params_ratio": _n_params(compressed) / params_dense,
        "ms_before": median["before"], "ms_after": median["after"],
        "speedup": sorted(ratios)[len(ratios) // 2], "speedup_interval": timing.median_interval(ratios),
        "rounds": len(ratios), "max_abs_diff": delta, "max_abs_output": scale,
        "max_abs_diff_expert_removal": routed,
        "removed": report.removed, "notes": report.notes, "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="python bench/model_families.py [--threads 1] [--json families.json]")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing per family (default 8)")
    parser.add_argument("--only", help="comma-separated family name prefixes (case-insensitive), e.g. llama,resnet")
    parser.add_argument("--notes", action="store_true", help="also print compress_report.notes per family")
    parser.add_argument("--json", type=Path, help="also write the rows (with removed/notes) to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = FAMILIES
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        families = [f for f in FAMILIES if any(f.name.lower().startswith(w) for w in wanted)]
    rows = [measure(f, args.budget) for f in families]
    print(f"\nbatch {BATCH} (seq {SEQ}), {SPARSITY:.0%} of each structure, {args.threads} thread(s), "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| family | structures removed | params before → after | latency ms before → after (speedup) "
          "| max \\|Δ\\| |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {', '.join(r['structures'])} | {r['params_before'] / 1e6:.2f}M → "
              f"{r['params_after'] / 1e6:.2f}M ({r['params_ratio']:.2f}×) | {r['ms_before']:.2f} → "
              f"{r['ms_after']:.2f} ({r['speedup']:.2f}×) | {r['max_abs_diff']:.1e} |")
    if args.notes:
        for r in rows:
            print(f"\n{r['family']}: {len(r['removed'])} removed, {len(r['notes'])} notes")
            for line in r["notes"]:
                print(f"  {line}")
    if args.json:
        atomic.write_json(args.json, rows)


if __name__ == "__main__":
    main()
