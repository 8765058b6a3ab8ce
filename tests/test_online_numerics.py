"""Online RL's numerics against hand computations on fixed tensors: per-token rewards, GAE,
whitening, RLOO and GRPO advantages, the clipped losses, the k3 KL estimator, the KL controllers."""

import math

import pytest
import torch

from rlhf_pipeline.advantages import (explained_variance, gae, group_normalized_advantages, kl_penalized_rewards,
                                      masked_whiten, rloo_advantages)
from rlhf_pipeline.kl_control import AdaptiveKLController, FixedKLController
from rlhf_pipeline.policy_gradient import (clipped_surrogate_loss, clipped_value_loss, grpo_loss, kl_k3,
                                          sequence_clipped_loss)

T = torch.tensor


def close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, T(want, dtype=got.dtype), rtol=1e-5, atol=1e-6)


JUNK = 99.0  # a value after a response's end: must never reach a result


def test_kl_penalized_rewards_by_hand():
    mask = T([[1.0, 1, 1], [1, 1, 0]])
    logprobs = T([[-1.0, -2, -3], [-1, -1, JUNK]])
    ref = T([[-1.5, -2, -2], [-2, -0.5, -JUNK]])
    rewards, kl = kl_penalized_rewards(T([1.0, -2.0]), logprobs, ref, mask, beta=0.1)
    # row 0: kl (0.5, 0, -1), score 1 on its third token; row 1: kl (1, -0.5), score -2 on its second
    close(kl, [[0.5, 0, -1], [1, -0.5, 0]])
    close(rewards, [[-0.05, 0, 1.1], [-0.1, 0.05 - 2, 0]])


def test_a_row_without_response_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        kl_penalized_rewards(T([1.0, 1.0]), torch.zeros(2, 2), torch.zeros(2, 2), T([[1.0, 0], [0, 0]]), 0.1)


def test_gae_by_hand():
    mask = T([[1.0, 1, 1], [1, 1, 0]])
    rewards = T([[0.0, 0, 1], [0, 2, JUNK]])
    values = T([[0.5, 0.4, 0.6], [1, 1, JUNK]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = (-0.1, 0.2, 0.4); A2 = 0.4, A1 = 0.2 + 0.5·0.4 = 0.4, A0 = -0.1 + 0.5·0.4 = 0.1
    # row 1: δ = (0, 1); A1 = 1, A0 = 0.5; nothing after its end
    close(adv, [[0.1, 0.4, 0.4], [0.5, 1, 0]])
    close(ret, [[0.6, 0.8, 1.0], [1.5, 2, 0]])


def test_gae_is_the_discounted_sum_of_td_residuals():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = T([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    gamma, lam = 0.9, 0.95
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate([6, 4, 1]):
        v = values[i, :n].tolist() + [0.0]
        delta = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        want = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
        assert adv[i, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert adv[i, n:].abs().sum().item() == 0
    assert torch.allclose(ret, (adv + values) * mask)


def test_gae_with_gamma_and_lambda_one_is_the_return_less_the_value():
    rewards, values, mask = T([[0.0, 1, 2]]), T([[3.0, 1, 1]]), torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    close(ret, [[3.0, 3, 2]])  # Σ_{t' ≥ t} r_t'
    close(adv, [[0.0, 2, 1]])


def test_whitening_uses_the_masked_tokens_only():
    x, mask = T([[1.0, 2, 3], [4, JUNK, JUNK]]), T([[1.0, 1, 1], [1, 0, 0]])
    out = masked_whiten(x, mask)
    sd = math.sqrt(1.25)  # of 1, 2, 3, 4 (population)
    close(out, [[-1.5 / sd, -0.5 / sd, 0.5 / sd], [1.5 / sd, 0, 0]])


def test_explained_variance():
    returns, mask = T([[1.0, 2], [3, 4]]), torch.ones(2, 2)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((2, 2), 2.5), returns, mask).item() == pytest.approx(0.0)
    # V = R - 1 everywhere: Var[R - V] = 0
    assert explained_variance(returns - 1, returns, mask).item() == pytest.approx(1.0)


def test_rloo_advantages_by_hand():
    adv = rloo_advantages(T([[1.0, 0, 0, 1], [2, 2, 2, 2]]))
    # 1 - (0 + 0 + 1)/3 = 2/3 ; 0 - 2/3
    close(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(T([[1.0]]))


def test_group_normalized_advantages_by_hand():
    adv = group_normalized_advantages(T([[1.0, 0, 0, 1], [5, 5, 5, 5]]))
    sd = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (sd + 1e-4)
    close(adv, [[a, -a, -a, a], [0, 0, 0, 0]])


def test_clipped_surrogate_by_hand_with_its_gradient():
    ratios = [1.5, 0.5, 1.1, 0.7, 3.0]
    old = torch.zeros(1, 5)
    logprobs = torch.log(T([ratios])).requires_grad_()
    adv, mask = T([[1.0, 1, -1, -1, 5]]), T([[1.0, 1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = clipped_surrogate_loss(logprobs, old, adv, mask, clip=0.2)
    # per token: max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(1.1, 1.1) = 1.1; max(0.7, 0.8) = 0.8
    # (clipped); the fifth is past the end
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratios[:4]) / 4)
    loss.backward()
    # d/dlogρ of -Aρ is -Aρ where the unclipped term is taken, 0 where the clip holds it
    close(logprobs.grad, [[0, -0.5 / 4, 1.1 / 4, 0, 0]])


def test_clipped_value_loss_by_hand():
    values, old, returns = T([[1.0, 2, 0]]), T([[1.5, 1.5, 0]]), T([[0.0, 3, 1]])
    loss, clip_fraction = clipped_value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    # clipped values (1.3, 1.7, 0): errors max(1, 1.69), max(1, 1.69), max(1, 1)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 1) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)


def test_k3_by_hand_and_unbiased_over_the_policy():
    assert kl_k3(T([-1.0]), T([-1.0])).item() == 0.0
    assert kl_k3(T([-1.0]), T([-2.0])).item() == pytest.approx(math.exp(-1))  # e^-1 + 1 - 1
    p, q = T([0.5, 0.3, 0.2]), T([0.2, 0.2, 0.6])
    per_token = kl_k3(p.log(), q.log())
    assert (per_token >= 0).all()
    assert (p * per_token).sum().item() == pytest.approx((p * (p / q).log()).sum().item(), abs=1e-6)


def test_grpo_loss_averages_per_response_then_over_responses():
    mask = T([[1.0, 1], [1, 0]])
    logprobs = T([[-1.0, -1], [-1, JUNK]]).requires_grad_()
    ref = T([[-1.0, -2], [-2, -JUNK]])
    loss, clip_fraction, kl = grpo_loss(logprobs, logprobs.detach(), ref, T([1.0, -2.0]), mask, clip=0.2, beta=0.5)
    k = math.exp(-1)
    # ratio 1: row 0 mean(-1 + 0, -1 + 0.5k); row 1: 2 + 0.5k; then the mean of the two rows
    assert loss.item() == pytest.approx(((-1 + (-1 + 0.5 * k)) / 2 + (2 + 0.5 * k)) / 2)
    assert clip_fraction.item() == 0
    assert kl.item() == pytest.approx(2 * k / 3)


def test_sequence_clipped_loss_by_hand_with_its_gradient():
    # RLOO as TRL's RLOOTrainer: one ratio per response from summed log-probs, a mean over responses
    old = T([-3.0, -5.0, -2.0])
    logprobs = (old + torch.log(T([1.0, 1.5, 0.5]))).requires_grad_()
    adv = T([1.0, 2.0, -1.0])
    loss, clip_fraction, approx_kl = sequence_clipped_loss(logprobs, old, adv, clip=0.2)
    # per response: max(-1, -1) = -1; max(-3, -2.4) = -2.4 (clipped); max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1 - 2.4 + 0.8) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx((0.5 * math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 3)
    loss.backward()
    close(logprobs.grad, [-1.0 / 3, 0, 0])  # the REINFORCE gradient -A_i ρ_i / n where unclipped
    # at ratio 1 (the first pass over a rollout) the gradient is REINFORCE's, -A_i / n, length-free
    fresh = old.clone().requires_grad_()
    sequence_clipped_loss(fresh, old, adv, clip=0.2)[0].backward()
    close(fresh.grad, [-1 / 3, -2 / 3, 1 / 3])


def test_k3_is_never_negative_near_zero_in_float32():
    # exp(x) - x - 1 loses every digit near 0: -5.96e-8 at x = 1e-6
    x = torch.tensor([1e-6, -1e-6, 1e-7, 3e-4, 0.0], dtype=torch.float32)
    kl = kl_k3(torch.zeros_like(x), x)
    assert (kl >= 0).all(), kl
    assert kl[0].item() == pytest.approx(0.5e-12, rel=1e-3)  # x^2 / 2


def test_adaptive_kl_controller_by_hand_and_its_state():
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # error clipped at +0.2
    b = ctl.beta
    assert ctl.update(3.0, 64) == pytest.approx(b * (1 - 0.2 * 64 / 10000))  # -0.5 clipped at -0.2
    b = ctl.beta
    assert ctl.update(6.6, 100) == pytest.approx(b * (1 + 0.1 * 100 / 10000))
    again = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    again.load_state_dict(ctl.state_dict())
    assert again.update(7.0, 10) == ctl.update(7.0, 10)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 10)


def test_adaptive_kl_coefficient_stays_positive():
    # kl_target 1, kl_horizon 1, 8 responses a step went β 0.05 -> -0.03: PPO refuses such a horizon ...
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.params import OnlineParams
    from rlhf_pipeline.registry import ONLINE_ALGORITHMS

    cfg = OnlineParams(algorithms={"ppo": {"name": "ppo", "kl_target": 1.0, "kl_horizon": 1}}, prompts_per_step=4,
                       num_responses=2)
    with pytest.raises(PipelineError, match="kl_horizon: 1 is shorter than the 8 responses of one rollout step"):
        ONLINE_ALGORITHMS.build(cfg.algorithms["ppo"], "online.algorithms.ppo").check_setting(cfg, "ppo")
    # ... the controller refuses a step that could flip β's sign ...
    with pytest.raises(ValueError, match="β could turn negative"):
        AdaptiveKLController(0.05, 1.0, 1).update(0.0, 8)
    # ... and with a horizon of one step β moves by at most 20 % a step, never below 0
    ctl = AdaptiveKLController(0.05, 1.0, 8)
    for _ in range(50):
        beta = ctl.update(0.0, 8)
    assert beta == pytest.approx(0.05 * 0.8 ** 50) and beta > 0


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05 and ctl.state_dict() == {"beta": 0.05}


def test_a_rollout_step_never_samples_a_prompt_twice():
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.online import step_prompt_order
    from rlhf_pipeline.training import episode_order

    # 10 prompts, 8 a step: step 1 straddles two permutations; cut blindly it held prompts 1 and 8 twice
    blind = episode_order(10, 24, 0)[8:16]
    assert len(set(blind)) < 8
    steps = step_prompt_order(10, 3, 8, 0)
    assert all(len(set(s)) == 8 for s in steps)
    assert steps[0] == episode_order(10, 8, 0)  # the first permutation's slice, as before
    # every prompt is used as often as the permutations give it, only delayed a step
    flat = [p for s in steps for p in s]
    assert all(flat.count(p) <= 3 for p in range(10)) and len(set(flat)) == 10
    # where the step size divides the prompts, the chunks are exactly the permutations' slices
    assert [p for s in step_prompt_order(8, 3, 4, 5) for p in s] == episode_order(8, 12, 5)
    with pytest.raises(PipelineError, match="online.prompts_per_step: 11 prompts per step, but there are 10"):
        step_prompt_order(10, 1, 11, 0)
