"""Online REBEL (Gao et al. 2024, arXiv 2404.16767, Algorithm 1 with fresh samples every step): a
prompt's responses in pairs, regression of the relative log-ratio to the sampling policy onto the
relative reward (the score less β·KL to π_ref, as the REBEL reference's online scripts).
``online.algorithms.<key>: {name: rebel, ...}``."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import sequence_logprobs
from rlhf_pipeline.losses import rebel_loss
from rlhf_pipeline.online import OnlineObjective, rows, sequence_reward
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import ONLINE_ALGORITHMS


@ONLINE_ALGORITHMS.register
class OnlineRebel(OnlineObjective):
    """Online REBEL (Gao et al. 2024, Eq. 1 / Algorithm 1; ``losses.rebel_loss``): example j is the
    pair of rows 2j and 2j+1 (two responses of one prompt); π_t is the sampling policy (its
    log-probs from the rollout) and the reward the score less β·KL(πθ_old ‖ π_ref). Figures: how
    often the predicted and the target reward gap have the same sign, and the mean |target gap|."""

    class Params(Section):
        """Online REBEL (Gao et al. 2024, Algorithm 1 with fresh samples every step)."""

        name: Literal["rebel"]
        eta: Number = Field(1.0, gt=0, description="REBEL η")
        kl_coef: Number = Field(0.05, ge=0, description="β: the reward is the score less β·KL(πθ_old ‖ π_ref)")


    metric_names = ("sign_agreement", "abs_target_reward_gap")
    responses_per_example = 2

    def lengths(self, r):
        return [len(r.prompt_tokens[i]) + max(len(r.response_tokens[i]), len(r.response_tokens[i + 1]))
                for i in range(0, len(r.prompt_ids), 2)]

    def tokens(self, r, idx):
        return sum(2 * len(r.prompt_tokens[2 * j]) + len(r.response_tokens[2 * j]) + len(r.response_tokens[2 * j + 1])
                   for j in idx)

    def prepare(self, r, values, beta):
        if len(r.prompt_ids) % 2 or r.prompt_ids[0::2] != r.prompt_ids[1::2]:
            raise PipelineError(f"rollout step {r.step}: rebel pairs a prompt's responses two by two; "
                                "online.num_responses must be even")
        return {"rewards": sequence_reward(r, beta), "old_logprobs": (r.logprobs * r.mask).sum(1)}

    def loss(self, model, r, prep, idx, pad_id, temperature):
        a, b = [2 * j for j in idx], [2 * j + 1 for j in idx]
        pa_, ra = rows(r, a)
        pb, rb = rows(r, b)
        logps = sequence_logprobs(model, pa_ + pb, ra + rb, pad_id, temperature)
        n, dev = len(idx), logps.device
        old, rewards = prep["old_logprobs"].to(dev), prep["rewards"].to(dev)
        loss, reg_diff = rebel_loss(logps[:n], logps[n:], old[a], old[b], rewards[a], rewards[b], self.cfg.eta)
        with torch.no_grad():
            target = rewards[a] - rewards[b]
            predicted = reg_diff + target
            agreement = (torch.sign(predicted) == torch.sign(target)).float().mean()
        return loss, [agreement, target.abs().mean()]

    def check_setting(self, online, key):
        if online.num_responses % 2:
            raise PipelineError(f"online.num_responses: rebel (online.algorithms.{key}) pairs a prompt's responses, so "
                                f"it needs an even number (got {online.num_responses})")
