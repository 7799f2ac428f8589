"""``lottery``: iterative magnitude pruning with rewinding, and its two controls.

- ``imp``: lottery-ticket level l, pruned from level l−1 and rewound to θ_k.
- ``reinit``: level l's mask on a fresh random initialisation.
- ``random``: a random mask with level l's per-layer densities, from θ_k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from ...config import SparsityConfig
from ...errors import ConfigError
from ...methods import LotteryTicket, random_prune, reinitialize, rewind_
from ...methods.lottery import level_configs
from ..schema import Fraction, NonNegativeInt, PositiveInt
from ..trainer import mix_seed
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol

if TYPE_CHECKING:
    from ..recipe import Recipe

Control = Literal["reinit", "random"]
CONTROLS: tuple[Control, ...] = ("reinit", "random")


class LotteryOptions(Options):
    """Prune ``prune_fraction`` of the remaining weights per level until the sparsity section's
    target; rewind to update ``rewind_step`` (0: θ0); train the ``controls`` at every
    ``controls_every``-th level and at the last."""

    prune_fraction: Fraction = 0.2
    rewind_step: NonNegativeInt = 0
    controls: list[Control] = list(CONTROLS)
    controls_every: PositiveInt = 1


@register_protocol("lottery")
class LotteryProtocol(Protocol):
    Options = LotteryOptions
    arms = (DENSE, Arm("imp", "IMP ticket", "IMP", "tab:blue"),
            Arm("reinit", "reinit control", "reinit", "tab:orange"),
            Arm("random", "random-prune control", "random", "tab:red"))
    legend = ("IMP: lottery tickets; reinit: a ticket's mask on a fresh initialisation; random: a random "
              "mask with the ticket's per-layer densities.")

    @staticmethod
    def levels(recipe: Recipe) -> list[SparsityConfig]:
        return level_configs(recipe.sparsity, recipe.method["prune_fraction"])

    def check(self, ctx: Context) -> None:
        total = ctx.recipe.train.epochs * ctx.steps_per_epoch
        if ctx.recipe.method["rewind_step"] >= total:
            raise ConfigError(f"method.rewind_step {ctx.recipe.method['rewind_step']} is not before the end of "
                              f"training ({total} steps)")

    def findings(self, results: dict[str, Any]) -> list[str]:
        """The two claims of the lottery ticket hypothesis, checked on the means."""
        from ..summary import cell

        entries = results["summary"]
        by = {(e["arm"], e["level"]): e for e in entries}
        dense = by.get(("dense", 0))
        tickets = [e for e in entries if e["arm"] == "imp"]
        if dense is None or not tickets:
            return []
        lines = []
        sparse = [e for e in tickets if e["remaining"] <= 0.20]
        if sparse:
            matching = [e for e in sparse if e["accuracy_mean"] >= dense["accuracy_mean"]]
            best = max(sparse, key=lambda e: e["accuracy_mean"])
            lines.append(f"IMP tickets at <= 20% of the weights: {len(matching)} of {len(sparse)} levels reach the "
                         f"dense accuracy ({cell(dense)}%); best {cell(best)}% at {100 * best['remaining']:.1f}% of "
                         f"the weights.")
        for ticket in tickets:
            reinit = by.get(("reinit", ticket["level"]))
            if ticket["remaining"] <= 0.07 and reinit is not None:
                gap = 100 * (ticket["accuracy_mean"] - reinit["accuracy_mean"])
                lines.append(f"At {100 * ticket['remaining']:.1f}% of the weights: IMP {cell(ticket)}% vs reinit "
                             f"{cell(reinit)}%, a gap of {gap:+.1f} points.")
        return lines

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        levels = self.levels(recipe)
        jobs = []
        for seed in recipe.seeds:
            previous = Job(seed, "dense")
            jobs.append(previous)
            for level, config in enumerate(levels, start=1):
                ticket = Job(seed, "imp", level, config.target_sparsity, parent=previous.key)
                jobs.append(ticket)
                if level % options["controls_every"] == 0 or level == len(levels):
                    jobs += [Job(seed, arm, level, ticket.target, parent=ticket.key) for arm in options["controls"]]
                previous = ticket
        return jobs

    def run(self, job: Job, ctx: Context) -> Outcome:
        options = ctx.recipe.method
        rewind_step = options["rewind_step"]

        def ticket_of(model: nn.Module, level: int, rewind_point: dict[str, Tensor] | None = None) -> LotteryTicket:
            return LotteryTicket(model, ctx.recipe.sparsity, data=ctx.calibration(job.seed),
                                 prune_fraction=options["prune_fraction"], rewind_step=rewind_step,
                                 rewind_point=rewind_point, level=level)

        if job.arm == "dense":
            model = ctx.new_model(init_seed(job.seed))
            ticket = ticket_of(model, 0)
            history = ctx.train(model, job, hooks=[ticket])
            return Outcome(model, history, extra={"rewind_point": ticket.rewind_point})
        rewind_point = ctx.extra(Job(job.seed, "dense").key)["rewind_point"]
        if job.arm == "imp":
            model = ctx.restore(job.parent_key)
            ticket_of(model, job.level - 1, rewind_point).next_level()
        elif job.arm == "reinit":
            model = reinitialize(ctx.restore(job.parent_key), ctx.new_model(mix_seed(job.seed, "reinit", job.level)))
        else:
            model = rewind_(ctx.new_model(init_seed(job.seed)), rewind_point)
            random_prune(model, ctx.restore(job.parent_key), self.levels(ctx.recipe)[job.level - 1],
                         seed=mix_seed(job.seed, "random", job.level))
        return Outcome(model, ctx.train(model, job, start_step=rewind_step))
