"""PPO for RLHF (Schulman et al. 2017, arXiv 1707.06347; Ziegler et al. 2019, arXiv 1909.08593;
Ouyang et al. 2022): per-token reward −β·(log πθ_old − log π_ref) with the score at the last token,
GAE, clipped surrogate and clipped value loss, a separate value model (a critic started from the
policy). ``online.algorithms.<key>: {name: ppo, ...}``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_pipeline.advantages import explained_variance, gae, kl_penalized_rewards, masked_whiten
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.kl_control import AdaptiveKLController, FixedKLController
from rlhf_pipeline.logprobs import token_logprobs_and_values
from rlhf_pipeline.online import OnlineObjective, rows
from rlhf_pipeline.params import Bool, Int, Number, Section
from rlhf_pipeline.policy_gradient import clipped_surrogate_loss, clipped_value_loss
from rlhf_pipeline.registry import ONLINE_ALGORITHMS


@ONLINE_ALGORITHMS.register
class Ppo(OnlineObjective):
    """PPO with a critic (Schulman et al. 2017, Eq. 7 and 9; GAE: Schulman et al. 2016, Eq. 16;
    RLHF rewards: Ziegler et al. 2019, Eq. 2). Loss = clipped surrogate + ``vf_coef`` × clipped
    value loss. Figures: the two losses, clip fractions, approximate KL(πθ_old ‖ πθ) per token,
    and the critic's explained variance on the step's returns (at rollout time)."""

    class Params(Section):
        """PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022)."""

        name: Literal["ppo"]
        clip: Number = Field(0.2, gt=0, description="ε of the clipped surrogate (TRL's cliprange)")
        clip_value: Number = Field(0.2, gt=0, description="ε_v: the value is clipped to V_old ± ε_v (TRL's "
                                   "cliprange_value)")
        vf_coef: Number = Field(0.1, ge=0, description="weight of the value loss in the one loss (TRL's vf_coef)")
        gamma: Number = Field(1.0, ge=0, le=1, description="GAE discount γ")
        lam: Number = Field(0.95, ge=0, le=1, description="GAE λ")
        whiten_advantages: Bool = Field(True, description="standardise the advantages over each rollout step")
        kl_coef: Number = Field(0.05, ge=0, description="β of the per-token KL penalty (the initial β when adaptive)")
        kl_target: Number | None = Field(None, gt=0, description="adaptive KL controller (Ziegler et al. 2019): "
                                         "the target KL per response, nats; null: β fixed")
        kl_horizon: Int = Field(10_000, gt=0, description="adaptive KL controller's horizon, responses; at least "
                                "the responses of one rollout step (prompts_per_step × num_responses), so one step "
                                "moves β by at most ±20 % and β stays positive")


    metric_names = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "value_clip_fraction",
                    "explained_variance")
    needs_value_model = True

    def kl_controller(self):
        if self.cfg.kl_target is None:
            return FixedKLController(self.cfg.kl_coef)
        return AdaptiveKLController(self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)

    def loss_units(self, r, idx):
        # both losses are means over the minibatch's response tokens (TRL's PPOTrainer: masked_mean)
        return sum(len(r.response_tokens[i]) for i in idx)

    def prepare(self, r, values, beta):
        rewards, _ = kl_penalized_rewards(r.rewards.float(), r.logprobs, r.ref_logprobs, r.mask, beta)
        advantages, returns = gae(rewards, values, r.mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = masked_whiten(advantages, r.mask)
        return {"advantages": advantages, "returns": returns, "values": values,
                "explained_variance": explained_variance(values, returns, r.mask)}

    def loss(self, model, r, prep, idx, pad_id, temperature):
        logps, values, mask = token_logprobs_and_values(model, *rows(r, idx), pad_id, temperature)
        t, dev = mask.shape[1], mask.device
        policy_loss, clip_fraction, approx_kl = clipped_surrogate_loss(
            logps, r.logprobs[idx, :t].to(dev), prep["advantages"][idx, :t].to(dev), mask, self.cfg.clip)
        value_loss, value_clip_fraction = clipped_value_loss(values, prep["values"][idx, :t].to(dev),
                                                             prep["returns"][idx, :t].to(dev), mask,
                                                             self.cfg.clip_value)
        loss = policy_loss + self.cfg.vf_coef * value_loss
        return loss, [policy_loss.detach(), value_loss.detach(), clip_fraction, approx_kl, value_clip_fraction,
                      prep["explained_variance"]]

    def check_setting(self, online, key):
        per_step = online.prompts_per_step * online.num_responses
        if self.cfg.kl_target is not None and self.cfg.kl_horizon < per_step:
            raise PipelineError(f"online.algorithms.{key}.kl_horizon: {self.cfg.kl_horizon} is shorter than the "
                                f"{per_step} responses of one rollout step (prompts_per_step × num_responses); the "
                                "adaptive controller would move β by more than 20 % a step, and below 0 past 5x")
