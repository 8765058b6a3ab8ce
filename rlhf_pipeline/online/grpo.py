"""GRPO (Shao et al. 2024, arXiv 2402.03300): group-normalised advantages of the score, clipped
ratio, k3 KL to π_ref in the loss. ``online.algorithms.<key>: {name: grpo, ...}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.advantages import group_normalized_advantages
from rlhf_pipeline.kl_control import FixedKLController
from rlhf_pipeline.logprobs import token_logprobs
from rlhf_pipeline.online import OnlineObjective, rows
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.policy_gradient import grpo_loss
from rlhf_pipeline.registry import ONLINE_ALGORITHMS


@ONLINE_ALGORITHMS.register
class Grpo(OnlineObjective):
    """GRPO (Shao et al. 2024, Eq. 3; ``policy_gradient.grpo_loss``): group-normalised advantages of
    the reward (no KL in it), β·k3 KL to π_ref in the loss. Figures: clip fraction, mean per-token
    k3 KL(πθ ‖ π_ref). Its ``beta`` figure is the loss's β."""

    class Params(Section):
        """GRPO (Shao et al. 2024)."""

        name: Literal["grpo"]
        clip: Number = Field(0.2, gt=0, description="ε of the clipped ratio")
        beta: Number = Field(0.04, ge=0, description="β of the k3 KL term in the loss (TRL's beta)")


    metric_names = ("clip_fraction", "kl_k3")

    def kl_controller(self):
        return FixedKLController(self.cfg.beta)

    def prepare(self, r, values, beta):
        return {"advantages": group_normalized_advantages(r.groups(r.rewards.float())).reshape(-1)}

    def loss(self, model, r, prep, idx, pad_id, temperature):
        logps, mask = token_logprobs(model, *rows(r, idx), pad_id, temperature)
        t, dev = mask.shape[1], mask.device
        loss, clip_fraction, kl = grpo_loss(logps, r.logprobs[idx, :t].to(dev), r.ref_logprobs[idx, :t].to(dev),
                                            prep["advantages"][idx].to(dev), mask, self.cfg.clip, self.cfg.beta)
        return loss, [clip_fraction, kl]
