"""An update's gradient does not depend on how its minibatch is split into micro-batches.

The loop groups a minibatch's examples into length-sorted micro-batches; a loss averaged per
micro-batch (then over micro-batches) would weigh a token of a short micro-batch many times a token
of a long one. ``training.backward_minibatch`` weighs each micro-batch by its share of the
minibatch's loss units (tokens or examples), so 1, 2 and 4 micro-batches of the same 8 examples
give the same gradient, for every task of the loop.
"""

import pyarrow as pa
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from rlhf_pipeline.logprobs import length_grouped_batches
from rlhf_pipeline.objectives import PairwiseTask, RewardModelTask, SftTask, make_objective
from rlhf_pipeline.params import TrainParams
from rlhf_pipeline.training import backward_minibatch
from test_online import ALGORITHMS, make_task, online_cfg, peaked_policy_dir  # noqa: F401 (fixture)
from test_training import reference, synthetic_pairs

CPU = torch.device("cpu")
#: response lengths of the 8 examples: a 20x spread, as the loop's length grouping meets in practice
LENGTHS = [24, 20, 15, 11, 8, 5, 3, 2]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each split makes its own Accelerator (accumulation steps differ); accelerate keeps one state per
    process, so it is reset around every test (and left clean for the next test module)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def split_gradient(model, task, per_device: int) -> tuple[float, torch.Tensor]:
    """(loss, flattened gradient) of one update over examples 0..7 in micro-batches of ``per_device``."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    examples = list(range(8))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=8 // per_device)
    model.zero_grad(set_to_none=True)
    micro = [[examples[i] for i in group] for group in
             length_grouped_batches([task.lengths[i] for i in examples], per_device)]
    assert len(micro) == 8 // per_device
    loss, _, _ = backward_minibatch(accelerator, model, task, micro)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss, grad


def assert_split_invariant(model, task):
    results = {n: split_gradient(model, task, n) for n in (8, 4, 2)}
    loss_one, grad_one = results[8]
    assert grad_one.norm() > 0
    for per_device in (4, 2):
        loss, grad = results[per_device]
        assert loss == pytest.approx(loss_one, rel=1e-5, abs=1e-6)  # RLOO's loss is 0 at ratio 1
        rel = float((grad - grad_one).norm() / grad_one.norm())
        assert rel < 2e-5, f"{8 // per_device} micro-batches: gradient differs by {rel:.2e} (relative)"


def varied_pairs():
    table = synthetic_pairs(8)
    chosen = [[500 + (j % 7) for j in range(n - 1)] + [2] for n in LENGTHS]
    rejected = [[600 + i] * max(1, n // 2) + [2] for i, n in enumerate(LENGTHS)]
    return table.set_column(table.schema.get_field_index("chosen_ids"), "chosen_ids", pa.array(chosen)) \
                .set_column(table.schema.get_field_index("rejected_ids"), "rejected_ids", pa.array(rejected))


@pytest.mark.parametrize("objective", [{"name": "rebel", "eta": 1.0}, {"name": "dpo"}, {"name": "ipo"},
                                       {"name": "simpo"}])
def test_pairwise_objectives(tiny_policy, objective):
    model, tok = tiny_policy
    pairs = varied_pairs()
    task = PairwiseTask(pairs, reference(model, tok, pairs), make_objective(TrainParams(objective=objective).objective),
                        tok.pad_token_id, 1.0, "pairs")
    assert_split_invariant(model, task)
    model.zero_grad(set_to_none=True)


def test_sft_is_the_nll_per_token_of_the_whole_minibatch(tiny_policy):
    model, tok = tiny_policy
    prompts = [[1, 100 + i, 300] for i in range(8)]
    responses = [[700 + (j * 13 + i) % 50 for j in range(n)] for i, n in enumerate(LENGTHS)]
    task = SftTask(prompts, responses, tok.pad_token_id, "demonstrations")
    assert_split_invariant(model, task)
    # and the loss is the minibatch's NLL per response token (not a mean of micro-batch means)
    from rlhf_pipeline.logprobs import sequence_logprobs

    with torch.no_grad():
        nll = -sequence_logprobs(model, prompts, responses, tok.pad_token_id, 1.0).sum() / sum(LENGTHS)
    assert split_gradient(model, task, 2)[0] == pytest.approx(float(nll), rel=1e-5)
    model.zero_grad(set_to_none=True)


def test_reward_model(tiny_model_dir):
    from rlhf_pipeline.models import load_tokenizer

    torch.manual_seed(0)
    pad = load_tokenizer(tiny_model_dir).pad_token_id
    chosen = [[1, 100 + i] + [500 + j % 9 for j in range(n)] for i, n in enumerate(LENGTHS)]
    rejected = [[1, 100 + i] + [600 + j % 5 for j in range(max(1, n // 3))] for i, n in enumerate(LENGTHS)]
    task = RewardModelTask(chosen, rejected, [0.0] * 8, pad, 0.01, "preference pairs")
    model = task.load_model(tiny_model_dir, torch.float32, CPU)
    assert_split_invariant(model, task)


@pytest.mark.parametrize("key", ["ppo", "rloo", "grpo", "rebel"])
def test_online_objectives(peaked_policy_dir, key):  # noqa: F811 (the fixture imported above)
    # 4 prompts x 4 responses: 16 responses (8 pairs for rebel); the first 8 examples are the minibatch
    cfg = online_cfg(algorithms={key: ALGORITHMS[key]}, max_new_tokens=24, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1)
    task = make_task(peaked_policy_dir, key, cfg)
    torch.manual_seed(0)
    model = task.load_model(peaked_policy_dir, torch.float32, CPU)
    task.before_update(model, 0)  # one real rollout step of the peaked policy (it never samples EOS) ...
    r = task.rollouts
    for i, n in enumerate(LENGTHS * 2):  # ... cut to varied lengths, as responses that stop would be
        r.response_tokens[i] = r.response_tokens[i][:n]
        for t in (r.mask, r.logprobs, r.ref_logprobs):
            t[i, n:] = 0
    task._set_step(r, task._values(model, r) if task.objective.needs_value_model else None, task.beta)
    assert_split_invariant(model, task)
