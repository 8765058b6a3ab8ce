"""Policy-gradient losses of online RL: PPO's clipped surrogate and value loss, GRPO, sequence-level
REINFORCE with a clipped ratio (RLOO), and the k3 KL estimator.

Apart from ``losses.py`` (the offline pairwise, SFT and Bradley–Terry losses on (batch,) sequence
sums) because these work per token: (batch, T) log-probs with the response ``mask`` of
``rlhf_pipeline.advantages`` (1.0 on a row's response tokens, 0.0 after them). Log-probs in nats.
"""

from __future__ import annotations

import torch

from rlhf_pipeline.advantages import masked_mean


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token, averaged over the batch's response tokens.

    Schulman et al., "Proximal Policy Optimization Algorithms", arXiv 1707.06347, Eq. 7, as a loss::

        ρ_t  = exp(log πθ(y_t|·) − log πθ_old(y_t|·))
        loss = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    Also returns the clip fraction (tokens where the clipped term is the larger) and the approximate
    KL(πθ_old ‖ πθ) by ½ (log ρ)² (Schulman, "Approximating KL Divergence", 2020, k2), both over
    the masked tokens: the diagnostics TRL's PPO logs.

    Args:
        logprobs: (batch, T) log πθ of the sampled tokens, nats (with grad).
        old_logprobs: (batch, T) the same under the policy that sampled them, nats.
        advantages: (batch, T) (PPO: GAE per token) or (batch, 1) (one advantage per response,
            broadcast over its tokens).
        mask: (batch, T).
        clip: ε > 0.

    Returns:
        (scalar loss, clip fraction, approximate KL in nats per token), the last two detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss with the value clipped around the rollout's value estimate.

    The value-function clipping of OpenAI's PPO2 (implementation detail 9 of Huang et al., "The 37
    Implementation Details of Proximal Policy Optimization", 2022; TRL's ``cliprange_value``)::

        V_clip = clip(V, V_old − ε_v, V_old + ε_v)
        loss   = ½ mean_t max((V − R)², (V_clip − R)²)

    Args:
        values: (batch, T) the value model's current V(s_t) (with grad), reward units.
        old_values: (batch, T) V(s_t) when the rollout was made.
        returns: (batch, T) the targets R_t (``advantages.gae``).
        mask: (batch, T).
        clip: ε_v > 0.

    Returns:
        (scalar loss, fraction of tokens where the clipped error is the larger, detached).
    """
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).float(), mask)
    return loss, clip_fraction


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(πθ ‖ π_ref) from a token sampled by πθ, unbiased and never negative.

    Shao et al., "DeepSeekMath", arXiv 2402.03300, Eq. 4 (Schulman 2020's k3)::

        kl_t = π_ref/πθ − log(π_ref/πθ) − 1,   log(π_ref/πθ) = ref_logprobs − logprobs

    computed as ``expm1(x) − x`` with x the log-ratio: ``exp(x) − x − 1`` loses every digit near
    x = 0 in float32 (−5.96e-8 at x = 1e-6, a negative "KL"), while ``expm1`` keeps them
    (e^x − 1 − x ≥ 0 for all x, and the rounded result stays ≥ 0).

    Args:
        logprobs, ref_logprobs: the same shape, nats.

    Returns:
        that shape, nats, ≥ 0.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO: the clipped surrogate with one advantage per response and a KL penalty in the loss.

    Shao et al., "DeepSeekMath", arXiv 2402.03300, Eq. 3, as a loss: per response the mean over its
    tokens, then the mean over responses (1/G Σ_i 1/|o_i| Σ_t)::

        ρ_t    = exp(log πθ − log πθ_old)
        loss_i = 1/|o_i| Σ_t [ max(−A_i ρ_t, −A_i clip(ρ_t, 1 − ε, 1 + ε)) + β kl_k3_t ]

    Args:
        logprobs: (batch, T) log πθ of the sampled tokens (with grad), nats.
        old_logprobs: (batch, T) under the sampling policy. ref_logprobs: (batch, T) under π_ref.
        advantages: (batch,) ``advantages.group_normalized_advantages``, flattened.
        mask: (batch, T). clip: ε. beta: β ≥ 0 (0: no reference policy needed, its log-probs unused).

    Returns:
        (scalar loss, clip fraction, mean per-token k3 KL to π_ref in nats), the last two detached.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    kl = kl_k3(logprobs, ref_logprobs)
    if beta:
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        mean_kl = masked_mean(kl, mask)
    return loss, clip_fraction, mean_kl


def sequence_clipped_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REINFORCE on whole responses with PPO's clipped ratio taken per sequence: RLOO's policy loss.

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv 2402.14740, Eq. 5 (the response is one action; REINFORCE,
    Williams 1992), with the clipped ratio of Schulman et al. 2017, Eq. 7 on the sequence
    probabilities, averaged over sequences, as TRL's 0.x ``RLOOTrainer``::

        ρ_i  = exp(log πθ(y_i|x_i) − log πθ_old(y_i|x_i))     (summed log-probs)
        loss = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1 − ε, 1 + ε))

    On the first pass over a rollout (ρ = 1) its gradient is the REINFORCE estimator
    −mean_i A_i ∇ log πθ(y_i|x_i). The variant that clips a per-token ratio and averages over
    tokens (``clipped_surrogate_loss``, PPO's) weighs long responses more; this one does not.

    Args:
        logprobs: (batch,) summed response log-probs under πθ (with grad), nats.
        old_logprobs: (batch,) the same under the sampling policy, nats.
        advantages: (batch,) one per response (``advantages.rloo_advantages``), no grad.
        clip: ε > 0.

    Returns:
        (scalar loss, share of responses whose clipped term is the larger, approximate
        KL(πθ_old ‖ πθ) per response ½ (log ρ)² in nats), the last two detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = (clipped > unclipped).float().mean()
        approx_kl = (0.5 * log_ratio ** 2).mean()
    return loss, clip_fraction, approx_kl
