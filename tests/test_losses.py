"""Each loss against a hand computation on fixed tensors."""

import math

import pytest
import torch

from rlhf_pipeline.losses import dpo_loss, ipo_loss, rebel_loss, simpo_loss

PC = torch.tensor([-10.0, -20.0])   # log πθ(y|x)
PR = torch.tensor([-12.0, -18.0])   # log πθ(y'|x)
RC = torch.tensor([-11.0, -19.0])   # log π0(y|x)
RR = torch.tensor([-11.5, -18.5])   # log π0(y'|x)
# Δ log-ratio per pair: (−10+11) − (−12+11.5) = 1.5 ; (−20+19) − (−18+18.5) = −1.5


def test_rebel_by_hand():
    loss, reg = rebel_loss(PC, PR, RC, RR, torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.7]), eta=0.5)
    # pair 1: 1.5/0.5 − 1 = 2 ; pair 2: −1.5/0.5 − (−0.5) = −2.5
    assert reg.tolist() == pytest.approx([2.0, -2.5])
    assert loss.item() == pytest.approx((4.0 + 6.25) / 2)


def test_rebel_is_zero_when_the_log_ratio_gap_equals_eta_times_reward_gap():
    loss, _ = rebel_loss(torch.tensor([0.3]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                         torch.tensor([3.0]), torch.tensor([0.0]), eta=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_dpo_by_hand():
    got = dpo_loss(PC, PR, RC, RR, beta=0.1).item()
    want = (-math.log(1 / (1 + math.exp(-0.15))) - math.log(1 / (1 + math.exp(0.15)))) / 2
    assert got == pytest.approx(want)


def test_ipo_by_hand():
    got = ipo_loss(PC, PR, RC, RR, tau=0.25).item()  # target 1/(2τ) = 2
    assert got == pytest.approx(((1.5 - 2) ** 2 + (-1.5 - 2) ** 2) / 2)


def test_simpo_by_hand():
    got = simpo_loss(PC, PR, torch.tensor([5.0, 10.0]), torch.tensor([4.0, 6.0]), beta=2.0, gamma=0.5).item()
    m1 = 2 * (-10 / 5) - 2 * (-12 / 4) - 0.5    # 1.5
    m2 = 2 * (-20 / 10) - 2 * (-18 / 6) - 0.5   # 1.5
    want = -math.log(1 / (1 + math.exp(-m1))) / 2 - math.log(1 / (1 + math.exp(-m2))) / 2
    assert got == pytest.approx(want)


def test_gradients_flow_to_policy_only():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    loss, _ = rebel_loss(pc, pr, RC, RR, torch.ones(2), torch.zeros(2), eta=1.0)
    loss.backward()
    # d/dpc mean((Δ/η − Δr)²) = 2 reg / (n η); reg = [0.5, −2.5]
    assert pc.grad.tolist() == pytest.approx([0.5, -2.5])
    assert pr.grad.tolist() == pytest.approx([-0.5, 2.5])


def test_sft_by_hand():
    from rlhf_pipeline.losses import sft_loss

    # two responses of 4 and 1 tokens with summed log-probs −2 and −3: (2 + 3) / 5 nats per token
    got = sft_loss(torch.tensor([-2.0, -3.0]), torch.tensor([4.0, 1.0]))
    assert got.item() == pytest.approx(1.0)
    lp = torch.tensor([-2.0, -3.0], requires_grad=True)
    sft_loss(lp, torch.tensor([4.0, 1.0])).backward()
    assert lp.grad.tolist() == pytest.approx([-0.2, -0.2])  # every token weighs the same


def test_bradley_terry_by_hand():
    import math

    from rlhf_pipeline.losses import bradley_terry_loss

    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # gaps 1 and −1: (log(1 + e^−1) + log(1 + e^1)) / 2
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected)
    # margin 1 on the first pair: its gap becomes 0, log 2
    with_margin = (math.log(2) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(rc, rr, torch.tensor([1.0, 0.0])).item() == pytest.approx(with_margin)
    # centring: + c · mean((2 + 1)², (0 + 1)²) = 0.1 · 5
    assert bradley_terry_loss(rc, rr, None, 0.1).item() == pytest.approx(expected + 0.5)
    c = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(c, torch.tensor([0.0])).backward()
    assert c.grad.item() == pytest.approx(-0.5)  # −σ(−0): raising the chosen reward lowers the loss
