"""DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7). ``train.objective: {name: dpo, beta}``;
with ``train.reference: previous`` and iterations, iterative DPO (the results recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.losses import dpo_loss
from rlhf_pipeline.objectives import PairBatch, PairObjective, margin_figures
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import OBJECTIVES


@OBJECTIVES.register
class Dpo(PairObjective):
    """DPO (:func:`rlhf_pipeline.losses.dpo_loss`). Logs the implicit reward margin β·Δ log-ratio
    and its accuracy."""

    class Params(Section):
        """DPO (Rafailov et al. 2023, Eq. 7)."""

        name: Literal["dpo"]
        beta: Number = Field(0.1, gt=0, description="β: inverse strength of the KL regulariser")

    metric_names = ("reward_margin", "reward_accuracy")

    def loss(self, b: PairBatch):
        loss = dpo_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, self.cfg.beta)
        return loss, margin_figures(self.cfg.beta * b.log_ratio_gap())
