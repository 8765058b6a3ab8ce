"""Losses of the one training loop: the pairwise REBEL, DPO, IPO, SimPO, SFT, and the
Bradley–Terry loss of a reward model.

Every loss takes tensors of shape (batch,): summed response log-probs (nats) of the chosen (y) and
rejected (y') response under the policy πθ and, where used, the reference policy π0, plus rewards
or lengths (SFT: one demonstrated response per row; Bradley–Terry: the reward model's scalar for
each side). They differ only here; data, batching and optimisation are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rebel_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
               eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REBEL: regress the relative reward with the relative log-ratio.

    Gao et al., "REBEL: Reinforcement Learning via Regressing Relative Rewards", arXiv 2404.16767,
    Eq. (1)/Algorithm 1::

        reg_diff = ((log πθ(y|x) − log π0(y|x)) − (log πθ(y'|x) − log π0(y'|x))) / η − (r(x,y) − r(x,y'))
        loss     = mean(reg_diff²)

    The reference implementation (ZhaolinGao/REBEL) minimises ((Δ log-ratio) − η (Δr))², the same
    objective scaled by η²: the minimiser is identical, and AdamW is invariant to a constant scale
    of the loss (up to eps) but gradient clipping is not: the gradient norm here is 1/η² times the
    reference's, so with η ≠ 1 ``max_grad_norm`` clips at another point of training than the same
    value does in the reference (η < 1: here more often; η > 1: less). To match the reference's
    clipping, scale ``max_grad_norm`` by 1/η².

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (batch,) summed log-probs, nats.
        reward_chosen, reward_rejected: (batch,) rewards.
        eta: η > 0.

    Returns:
        (scalar loss, reg_diff of shape (batch,)).
    """
    predicted_gap = ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)) / eta
    reg_diff = predicted_gap - (reward_chosen - reward_rejected)
    return reg_diff.pow(2).mean(), reg_diff


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: −log σ(β (Δ log-ratio)).

    Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, Eq. (7). Inputs are
    (batch,) summed log-probs in nats; returns the scalar mean loss.
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits).mean()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO: (Δ log-ratio − 1/(2τ))².

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv 2310.12036, Eq. (17), with summed log-probs as in the paper (TRL averages them per
    token). Inputs (batch,) in nats; returns the scalar mean loss.
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (logits - 1.0 / (2.0 * tau)).pow(2).mean()


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO: −log σ(β/|y| log πθ(y|x) − β/|y'| log πθ(y'|x) − γ); no reference policy.

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv 2405.14734, Eq. (6). ``chosen_tokens``/``rejected_tokens``: (batch,) response lengths in
    tokens; log-probs (batch,) summed, nats. Returns the scalar mean loss.
    """
    margin = beta * policy_chosen / chosen_tokens - beta * policy_rejected / rejected_tokens - gamma
    return -F.logsigmoid(margin).mean()


def sft_loss(response_logprobs: torch.Tensor, response_tokens: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: the negative log-likelihood of the demonstrated responses, per token.

    Maximum likelihood on demonstrations, the first step of Ouyang et al., "Training language models
    to follow instructions with human feedback", arXiv 2203.02155, Sec. 3.5 (SFT); the loss is on
    response tokens only (prompt tokens are context, not targets) and averaged over the micro-batch's
    tokens, as TRL's ``SFTTrainer`` with ``completion_only_loss``::

        loss = −Σ_i log πθ(y_i | x_i) / Σ_i |y_i|

    Args:
        response_logprobs: (batch,) summed log-probs of each response, nats.
        response_tokens: (batch,) response lengths, tokens.

    Returns:
        scalar loss, nats per token.
    """
    return -response_logprobs.sum() / response_tokens.sum()


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coefficient: float | None = None) -> torch.Tensor:
    """Reward-model loss: the negative log-likelihood of the preferences under Bradley–Terry.

    Ouyang et al., "Training language models to follow instructions with human feedback", arXiv
    2203.02155, Eq. 1 (per comparison; Stiennon et al. 2020 before it); the optional margin is Llama 2's
    (Touvron et al., arXiv 2307.09288, Eq. 2) and the centring term Eisenstein et al.'s (arXiv
    2312.09244), as TRL's ``RewardTrainer`` (``margin`` column, ``center_rewards_coefficient``)::

        loss = mean(−log σ(r(x, y) − r(x, y') − m)) + c · mean((r(x, y) + r(x, y'))²)

    Args:
        reward_chosen, reward_rejected: (batch,) the reward model's scalar for each side.
        margin: (batch,) m, or None for 0.
        center_coefficient: c, or None for no centring term.

    Returns:
        scalar loss, nats per comparison (plus the centring term).
    """
    gap = reward_chosen - reward_rejected
    if margin is not None:
        gap = gap - margin
    loss = -F.logsigmoid(gap).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((reward_chosen + reward_rejected) ** 2).mean()
    return loss
