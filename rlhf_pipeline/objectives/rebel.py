"""REBEL (Gao et al. 2024, arXiv 2404.16767, Eq. 1): regress the reward gap with the log-ratio gap
over η. ``train.objective: {name: rebel, eta}``."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhf_pipeline.losses import rebel_loss
from rlhf_pipeline.objectives import PairBatch, PairObjective
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import OBJECTIVES


@OBJECTIVES.register
class Rebel(PairObjective):
    """REBEL (:func:`rlhf_pipeline.losses.rebel_loss`). Logs the predicted reward gap (Δ log-ratio
    / η), the target reward gap r(x,y) − r(x,y') and how often their signs agree."""

    class Params(Section):
        """REBEL (Gao et al. 2024, Eq. 1): regress the reward gap with the log-ratio gap over η."""

        name: Literal["rebel"]
        eta: Number = Field(1.0, gt=0, description="REBEL η: the log-ratio gap is regressed onto η × reward gap")

    metric_names = ("predicted_reward_gap", "target_reward_gap", "sign_agreement")

    def loss(self, b: PairBatch):
        loss, _ = rebel_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, b.reward_chosen,
                             b.reward_rejected, self.cfg.eta)
        predicted, target = b.log_ratio_gap() / self.cfg.eta, b.reward_chosen - b.reward_rejected
        return loss, {"predicted_reward_gap": predicted.mean(), "target_reward_gap": target.mean(),
                      "sign_agreement": (torch.sign(predicted) == torch.sign(target)).float().mean()}
