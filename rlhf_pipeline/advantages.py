"""Rewards, advantages and returns of online RL: what a rollout's scores become before a loss sees them.

Two layouts. Per token: (batch, T) tensors over the response tokens, right-padded, with ``mask``
(batch, T) equal to 1.0 on row i's first ``len_i`` positions (its response tokens) and 0.0 after
them; every row has at least one token. Per group: (prompts, k) tensors, the k responses sampled for
each prompt (RLOO and GRPO compare a response only with its own prompt's others).

Rewards are in the scorer's units; log-probs in nats; values in reward units.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    Args:
        x, mask: the same shape; mask is 0/1.

    Returns:
        a scalar (``dim`` None) or ``x`` reduced along ``dim``.
    """
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantage whitening: (x − mean) / sqrt(var + eps) over the masked positions, 0 elsewhere.

    The per-batch normalisation of PPO's advantages (Schulman et al. 2017's implementation, PPO2;
    implementation detail 7 of Huang et al., "The 37 Implementation Details of Proximal Policy
    Optimization", ICLR blog track 2022). The variance is the population one (divided by the count).

    Args:
        x, mask: (batch, T).

    Returns:
        (batch, T), masked positions whitened, the others 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of each row's last response token.

    Raises:
        ValueError: a row with no response token (nothing to put the reward on).
    """
    lengths = mask.sum(1).long()
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no response token")
    return lengths - 1


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF's PPO: the KL penalty on every token, the score on the last one.

    Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593, Eq. 2
    (R(x, y) = r(x, y) − β log(π(y|x)/ρ(y|x))), spread over tokens as in Stiennon et al. 2020 and
    Ouyang et al. 2022, Eq. 2::

        kl_t      = log πθ_old(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)
        reward_t  = −β · kl_t + [t = last] · score

    Args:
        scores: (batch,) the scorer's reward per response.
        logprobs: (batch, T) per-token log-probs of the sampling policy, nats.
        ref_logprobs: (batch, T) the reference policy's, nats.
        mask: (batch, T).
        beta: β ≥ 0, the KL coefficient (fixed or from the adaptive controller).

    Returns:
        (rewards (batch, T), kl (batch, T)), both 0 after each response.

    Raises:
        ValueError: a row with no response token.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation and the value targets.

    Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv 1506.02438, Eq. 16 with the TD residual of their Sec. 3::

        δ_t = r_t + γ V(s_{t+1}) − V(s_t)          (V after the last token: 0, the episode ends)
        A_t = Σ_l (γλ)^l δ_{t+l}  =  δ_t + γλ A_{t+1}
        R_t = A_t + V(s_t)                           (the value model's target, "returns")

    Args:
        rewards: (batch, T) per-token rewards (``kl_penalized_rewards``).
        values: (batch, T) the value model's V(s_t) at each response token, reward units.
        mask: (batch, T).
        gamma: discount γ in [0, 1]. lam: λ in [0, 1].

    Returns:
        (advantages (batch, T), returns (batch, T)), 0 after each response.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the response tokens: 1 when the value model predicts the
    returns exactly, 0 when it does no better than their mean, negative when worse (the PPO
    diagnostic of OpenAI Baselines; Huang et al. 2022). A scalar tensor; NaN when Var[R] is 0."""
    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    return 1 - var(returns - values) / var(returns)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each response's reward less the mean of the others'.

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv 2402.14740, the RLOO estimator (after Kool et al. 2019)::

        A_i = r_i − 1/(k−1) Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean_j r_j)

    Args:
        rewards: (prompts, k) sequence rewards (the score less β times the sequence KL, for RLOO).

    Returns:
        (prompts, k) advantages; each row sums to 0.

    Raises:
        ValueError: k < 2 (no other response to compare with).
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 responses per prompt, got {k}")
    return (rewards - rewards.mean(1, keepdim=True)) * (k / (k - 1))


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each response's reward standardised within its prompt's group.

    Shao et al., "DeepSeekMath", arXiv 2402.03300, Sec. 4.1.2 (outcome supervision)::

        A_i = (r_i − mean(r)) / (std(r) + eps)

    with the unbiased standard deviation and eps = 1e-4 as TRL's ``GRPOTrainer``; a group whose
    rewards are all equal gets advantage 0 (it carries no signal).

    Args:
        rewards: (prompts, k) sequence rewards.

    Returns:
        (prompts, k) advantages.

    Raises:
        ValueError: k < 2.
    """
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO needs at least 2 responses per prompt, got {rewards.shape[1]}")
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)
