"""IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17). ``train.objective: {name: ipo, tau}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.losses import ipo_loss
from rlhf_pipeline.objectives import PairBatch, PairObjective, margin_figures
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import OBJECTIVES


@OBJECTIVES.register
class Ipo(PairObjective):
    """IPO (:func:`rlhf_pipeline.losses.ipo_loss`). Logs the log-ratio gap (its target is 1/(2τ))
    and how often it is positive."""

    class Params(Section):
        """IPO (Azar et al. 2023, Eq. 17)."""

        name: Literal["ipo"]
        tau: Number = Field(0.1, gt=0, description="τ: the log-ratio gap is regressed onto 1/(2τ)")

    metric_names = ("reward_margin", "reward_accuracy")

    def loss(self, b: PairBatch):
        loss = ipo_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, self.cfg.tau)
        return loss, margin_figures(b.log_ratio_gap())
