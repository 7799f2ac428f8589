"""``edgepopup``: strong lottery tickets. A trained dense network (``dense``) against edge-popup
subnetworks of the same network at random weights (``edgepopup``: only the scores train) and
lottery jackpots (``jackpot``: the same search over the trained dense weights, scores from |w|)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from ...methods.edgepopup import edge_popup_, finalize_, lottery_jackpot_
from ..schema import Fraction
from ..trainer import TrainConfig, TrainSchema, mix_seed
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense

if TYPE_CHECKING:
    from ..recipe import Recipe

EDGEPOPUP = Arm("edgepopup", "edge-popup", color="tab:purple")
EdgePopupArm = Literal["dense", "edgepopup", "jackpot"]
ARMS: tuple[EdgePopupArm, ...] = ("dense", "edgepopup", "jackpot")


class EdgePopupOptions(Options):
    """Keep ``density`` of every layer; random weights drawn as ``init``; the score search trains
    as ``search`` says (a train section); the dense network trains on the recipe's train section."""

    density: Fraction = 0.5
    init: Literal["signed_constant", "kaiming_normal"] = "signed_constant"
    search: TrainSchema = TrainSchema.model_validate(dict(optimizer="sgd", lr=0.1, momentum=0.9, epochs=40,
                                                         batch_size=100, schedule="cosine"))
    arms: Annotated[list[EdgePopupArm], Field(min_length=1)] = list(ARMS)

    @model_validator(mode="after")
    def _jackpot_needs_dense(self) -> EdgePopupOptions:
        if "jackpot" in self.arms and "dense" not in self.arms:
            raise ValueError("the jackpot arm searches the trained dense network: add 'dense' to arms")
        return self


@register_protocol("edgepopup")
class EdgePopupProtocol(Protocol):
    Options = EdgePopupOptions
    arms = (DENSE, EDGEPOPUP, Arm("jackpot", "lottery jackpot", "jackpot", "tab:green"))
    sections = ("data", "model", "train")

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        target = 1.0 - options["density"]
        return [Job(seed, arm, 0 if arm == "dense" else 1, 0.0 if arm == "dense" else target,
                    parent=Job(seed, "dense").key if arm == "jackpot" else None)
                for seed in recipe.seeds for arm in ARMS if arm in options["arms"]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        options = ctx.recipe.method
        if job.arm == "edgepopup":
            model = ctx.new_model(init_seed(job.seed))
            edge_popup_(model, options["density"], init=options["init"], seed=mix_seed(job.seed, "edgepopup") % 2**31)
        else:
            model = ctx.restore(job.parent_key)
            lottery_jackpot_(model, options["density"])
        history = ctx.train(model, job, config=TrainConfig(**options["search"]))
        return Outcome(finalize_(model, as_masks=True), history)
