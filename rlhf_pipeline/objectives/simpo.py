"""SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free, length-normalised.
``train.objective: {name: simpo, beta, gamma}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.losses import simpo_loss
from rlhf_pipeline.objectives import PairBatch, PairObjective, margin_figures
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import OBJECTIVES


@OBJECTIVES.register
class Simpo(PairObjective):
    """SimPO (:func:`rlhf_pipeline.losses.simpo_loss`); no reference policy. Logs the
    length-normalised margin β/|y| log πθ(y|x) − β/|y'| log πθ(y'|x) and its accuracy."""

    class Params(Section):
        """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised."""

        name: Literal["simpo"]
        beta: Number = Field(2.0, gt=0, description="β: scale of the length-normalised log-prob")
        gamma: Number = Field(0.5, ge=0, description="γ: target reward margin")

    metric_names = ("reward_margin", "reward_accuracy")

    def loss(self, b: PairBatch):
        loss = simpo_loss(b.policy_chosen, b.policy_rejected, b.chosen_tokens, b.rejected_tokens, self.cfg.beta,
                          self.cfg.gamma)
        margin = self.cfg.beta * (b.policy_chosen / b.chosen_tokens - b.policy_rejected / b.rejected_tokens)
        return loss, margin_figures(margin)
