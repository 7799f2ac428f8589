"""``adapters``: parameter-efficient fine-tuning across a shift of domain, MoRe against LoRA.

The built-in LM pretrained on the corpus' English prose only (``LMConfig(data="prose")``,
cached) is adapted to its code samples: not at all, by full fine-tuning, by LoRA (``peft``) at
each of ``lora_ranks`` and by MoRe adapters of each ``more`` shape (blocks × block rank), on
every Linear of the decoder blocks. Each fine-tunes ``steps`` batches of random code windows
of the train split (seed: adapter initialisation and batch order); perplexity is measured on
the test split's code (the new domain) and prose (what was forgotten). No data, model, train
or sparsity section: the options say everything.
"""

from __future__ import annotations

import copy
import statistics
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from ..schema import PositiveFloat, PositiveInt
from .base import Arm, Context, Job, Options, Outcome, Protocol, register_protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console

    from ..recipe import Recipe

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # lm_head stays frozen
ARMS = (Arm("none", "no adaptation", color="tab:gray", sparse=False),
        Arm("full", "full fine-tuning", color="black", sparse=False),
        Arm("lora", "LoRA (peft)", "LoRA", "tab:blue", sparse=False),
        Arm("more", "MoRe", "MoRe", "tab:red", sparse=False))


class AdaptersOptions(Options):
    """``steps`` of fine-tuning per arm (batches of ``batch_size`` windows of the LM's length);
    ``lora_ranks`` and ``more`` ([blocks, block rank] pairs) the adapter shapes; ``lr_*`` the
    learning rate of each family; ``eval_windows`` caps the perplexity windows (default: all)."""

    steps: PositiveInt = 120
    batch_size: PositiveInt = 8
    lora_ranks: list[PositiveInt] = [1, 2, 4, 8, 16]
    more: list[Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]] = [[2, 1], [4, 1], [8, 1],
                                                                                  [2, 2], [4, 2], [8, 2]]
    lr_full: PositiveFloat = 3e-3
    lr_lora: PositiveFloat = 1e-2
    lr_more: PositiveFloat = 3e-2
    eval_windows: PositiveInt | None = None
    tiny: bool = False  # a 1-layer LM that trains in seconds (tests)


def shapes(options: dict[str, Any], family: str) -> list[dict[str, int]]:
    """The adapter shape of each level of ``family``."""
    if family == "lora":
        return [{"r": r} for r in options["lora_ranks"]]
    if family == "more":
        return [{"nblocks": b, "block_rank": q} for b, q in options["more"]]
    return [{}]


def adapted(base: Any, family: str, shape: dict[str, int], seed: int) -> Any:
    """A copy of ``base`` with the family's trainable parameters (adapters' init seeded by ``seed``)."""
    import torch

    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "lora":
            import peft

            # alpha = r: scale 1 at every rank, as MoRe's scale=1; the lr is tuned per family instead
            config = peft.LoraConfig(r=shape["r"], lora_alpha=shape["r"], lora_dropout=0.0, target_modules=TARGETS)
            return peft.get_peft_model(model, config)
        if family == "more":
            from ...formats.more import MoReConfig, add_more_

            return add_more_(model, MoReConfig(nblocks=shape["nblocks"], block_rank=shape["block_rank"],
                                               include=[f"*.{t}" for t in TARGETS]))
    return model  # "full": every parameter trains; "none": not trained


def label(family: str, shape: dict[str, int]) -> str:
    if family == "lora":
        return f"LoRA r={shape['r']}"
    if family == "more":
        return f"MoRe {shape['nblocks']}x{shape['block_rank']}"
    return next(a.label for a in ARMS if a.name == family)


def lm_config(tiny: bool) -> Any:
    from ...text import LMConfig

    if tiny:
        return LMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, seq_len=64, batch_size=8, steps=30, lr=1e-2, warmup_steps=5,
                        data="prose")
    return LMConfig(data="prose")


@register_protocol("adapters")
class AdaptersProtocol(Protocol):
    Options = AdaptersOptions
    arms = ARMS
    sections = ()
    metric = ("code_perplexity", "code_perplexity")

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        jobs = [Job(recipe.seeds[0], "none")]  # nothing random, nothing trained: one evaluation
        for seed in recipe.seeds:
            jobs.append(Job(seed, "full"))
            jobs += [Job(seed, family, level) for family in ("lora", "more")
                     for level in range(1, len(shapes(options, family)) + 1)]
        return jobs

    def run(self, job: Job, ctx: Context) -> Outcome:
        from ...text import builtin_lm, domain_text, encode, fine_tune, perplexity

        options = ctx.recipe.method
        config = lm_config(options["tiny"])
        base, tokenizer = builtin_lm(config=config)
        shape = shapes(options, job.arm)[max(job.level - 1, 0)]
        model = adapted(base, job.arm, shape, job.seed)
        total = sum(p.numel() for p in base.parameters())
        trainable = 0 if job.arm == "none" else sum(p.numel() for p in model.parameters() if p.requires_grad)
        if job.arm != "none":
            fine_tune(model, encode(domain_text("train", "code"), tokenizer), steps=options["steps"],
                      lr=options[f"lr_{job.arm}"], seq_len=config.seq_len, batch_size=options["batch_size"],
                      warmup_steps=max(1, options["steps"] // 10), seed=job.seed)
        found = {f"{kind}_perplexity": perplexity(model, encode(domain_text("test", kind), tokenizer),
                                                  seq_len=config.seq_len, max_windows=options["eval_windows"])
                 for kind in ("code", "prose")}
        row: dict[str, Any] = {"step": options["steps"], "trainable": trainable, "parameters": total,
                               "label": label(job.arm, shape), **found}
        return Outcome(model, [row])

    def result(self, job: Job, outcome: Outcome, ctx: Context) -> dict[str, Any]:
        stats = {k: v for k, v in outcome.history[-1].items() if k != "step"}
        return {"key": job.key, "seed": job.seed, "arm": job.arm, "level": job.level, "target_sparsity": 0.0,
                "remaining": stats["trainable"] / stats["parameters"], **stats}

    def describe(self, row: dict[str, Any]) -> str:
        return (f"{row['label']:<18} {row['trainable']:>9,} trainable   code perplexity {row['code_perplexity']:.3f}"
                f"   prose {row['prose_perplexity']:.3f}")

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        lines = ["Perplexity on the test split's code (the new domain) and prose (the pretraining domain), "
                 "mean ± sample std over seeds.", "",
                 "| arm | trainable parameters | % of the model | code perplexity | prose perplexity | seeds |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, rows in _by_arm(results).items():
            lines.append(f"| {name} | {rows[0]['trainable']:,} | {100 * rows[0]['remaining']:.2f} | "
                         f"{_mean_std(rows, 'code_perplexity')} | {_mean_std(rows, 'prose_perplexity')} "
                         f"| {len(rows)} |")
        return lines

    def plots(self) -> dict[str, Any]:
        return {"perplexity_vs_trainable.png": lambda results, history: perplexity_vs_trainable(results)}

    def print_summary(self, results: dict[str, Any], console: Console) -> None:
        from rich.table import Table

        table = Table("arm", "trainable", "code perplexity", "prose perplexity", "seeds",
                      title=f"{results['name']}: adapting a prose LM to code"
                            + ("" if results.get("complete") else " (incomplete run)"))
        for name, rows in _by_arm(results).items():
            table.add_row(name, f"{rows[0]['trainable']:,}", _mean_std(rows, "code_perplexity"),
                          _mean_std(rows, "prose_perplexity"), str(len(rows)))
        console.print(table)


def _by_arm(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    order = {a.name: i for i, a in enumerate(ARMS)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(results["jobs"], key=lambda r: (order.get(r["arm"], 9), r["level"], r["seed"])):
        groups.setdefault(row["label"], []).append(row)
    return groups


def _mean_std(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def perplexity_vs_trainable(results: dict[str, Any]) -> Figure | None:
    """Code perplexity against trainable parameters (log x): a line per adapter family (MoRe: per
    block count), full fine-tuning a star, no adaptation a dashed line."""
    from matplotlib.figure import Figure

    groups = _by_arm(results)
    if not groups:
        return None
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot()
    lines: dict[str, list[list[dict[str, Any]]]] = {}
    for name, rows in groups.items():
        family = rows[0]["arm"]
        key = {"lora": "LoRA", "more": f"MoRe {name.split()[1].split('x')[0]} blocks"}.get(family, name)
        lines.setdefault(key, []).append(rows)
    for key, points in lines.items():
        means = [statistics.fmean(r["code_perplexity"] for r in rows) for rows in points]
        if key == "no adaptation":
            axis.axhline(means[0], color="tab:gray", linestyle="--", label=key)
            continue
        errors = [statistics.stdev([r["code_perplexity"] for r in rows]) if len(rows) > 1 else 0.0
                  for rows in points]
        style = "*" if key == "full fine-tuning" else "o-" if key == "LoRA" else "s--"
        axis.errorbar([rows[0]["trainable"] for rows in points], means, yerr=errors, fmt=style, capsize=3,
                      label=key)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("code perplexity (test)")
    axis.set_title(f"{results['name']}: adapting a prose-pretrained LM to code", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


__all__ = ["AdaptersProtocol", "TARGETS", "adapted", "label", "shapes"]
