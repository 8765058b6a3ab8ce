"""RLOO (Ahmadian et al. 2024, arXiv 2402.14740): the leave-one-out baseline over a prompt's k
responses, on the sequence reward less β·KL, with PPO's clipped ratio (as TRL's RLOOTrainer).
``online.algorithms.<key>: {name: rloo, ...}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.advantages import rloo_advantages
from rlhf_pipeline.logprobs import sequence_logprobs
from rlhf_pipeline.online import OnlineObjective, rows, sequence_reward
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.policy_gradient import sequence_clipped_loss
from rlhf_pipeline.registry import ONLINE_ALGORITHMS


@ONLINE_ALGORITHMS.register
class Rloo(OnlineObjective):
    """RLOO as TRL's RLOOTrainer (the 0.x trainer of the RLOO paper's setting): REINFORCE on whole
    responses (Ahmadian et al. 2024, arXiv 2402.14740, Eq. 5) with the leave-one-out baseline over a
    prompt's k responses (``advantages.rloo_advantages``) of the score less β·KL, and PPO's clipped
    ratio (Schulman et al. 2017, Eq. 7) taken once per *sequence*, on summed log-probs, averaged
    over sequences (``policy_gradient.sequence_clipped_loss``). Sequence-level because the paper
    models the whole response as one action: a per-token ratio with a token mean (PPO's) would weigh
    long responses more and clip tokens separately. Figures: the share of responses whose ratio
    was clipped, approximate KL(πθ_old ‖ πθ) per response (½ (log ρ)², nats)."""

    class Params(Section):
        """RLOO (Ahmadian et al. 2024) with PPO's clipped ratio, as TRL's RLOOTrainer."""

        name: Literal["rloo"]
        clip: Number = Field(0.2, gt=0, description="ε of the clipped ratio")
        kl_coef: Number = Field(0.05, ge=0, description="β: the sequence reward is the score less "
                                "β·KL(πθ_old ‖ π_ref)")


    metric_names = ("clip_fraction", "approx_kl")

    def prepare(self, r, values, beta):
        return {"advantages": rloo_advantages(r.groups(sequence_reward(r, beta))).reshape(-1),
                "old_logprobs": (r.logprobs * r.mask).sum(1)}

    def loss(self, model, r, prep, idx, pad_id, temperature):
        logps = sequence_logprobs(model, *rows(r, idx), pad_id, temperature)
        dev = logps.device
        loss, clip_fraction, approx_kl = sequence_clipped_loss(
            logps, prep["old_logprobs"][idx].to(dev), prep["advantages"][idx].to(dev), self.cfg.clip)
        return loss, [clip_fraction, approx_kl]
