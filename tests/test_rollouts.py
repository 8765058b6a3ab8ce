"""Rollouts of online RL on the tiny policy: per-token log-probs, seeds, scores, the table."""

import pyarrow as pa
import pytest
import torch

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.generation import response_seed
from rlhf_pipeline.logprobs import batched_token_logprobs, sequence_logprobs, token_logprobs
from rlhf_pipeline.params import RewardParams, SamplingParams
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.rollouts import collect_rollouts, step_seed
from rlhf_pipeline.schemas import ROLLOUTS

PROMPTS = pa.table({"prompt_id": ["b", "a", "c"],
                    "prompt": ["Write one word.", "Say hello to the world in a short sentence.", "Count to three."]})
SAMPLING = SamplingParams(num_responses=2, max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=4,
                          dtype="float32")


@pytest.fixture(scope="module")
def scorers(tiny_reward_model_dir):
    return Scorers(RewardParams(scorers=[{"name": "sequence-classification", "weight": 1.0,
                                          "options": {"model": str(tiny_reward_model_dir), "dtype": "float32"}}],
                                missing_eos_penalty=None))


def test_token_logprobs_sum_to_the_sequence_logprobs_left_aligned(tiny_policy):
    model, tok = tiny_policy
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    responses = [[20, 21, 22, 23], [24], [25, 26]]
    with torch.no_grad():
        logps, mask = token_logprobs(model, prompts, responses, tok.pad_token_id, temperature=0.7)
        want = sequence_logprobs(model, prompts, responses, tok.pad_token_id, temperature=0.7)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    torch.testing.assert_close(logps.sum(1), want)
    # the first token of each row, alone, is its one-token sequence's log-prob
    with torch.no_grad():
        first = sequence_logprobs(model, prompts, [r[:1] for r in responses], tok.pad_token_id, temperature=0.7)
    torch.testing.assert_close(logps[:, 0], first)
    batched = batched_token_logprobs(model, prompts, responses, tok.pad_token_id, 0.7, batch_size=2)
    torch.testing.assert_close(batched, logps, rtol=1e-5, atol=1e-5)


def test_a_rollout_step_is_seeded_scored_and_reproducible(tiny_policy, scorers):
    model, tok = tiny_policy
    r = collect_rollouts(model, model, tok, PROMPTS, SAMPLING, scorers, seed=3, step=5, missing_eos_penalty=None,
                         logprob_batch_size=4)
    assert r.prompt_ids == ["a", "a", "b", "b", "c", "c"] and r.response_idx == [0, 1] * 3
    assert r.seeds == [response_seed(step_seed(3, 5), pid, k) for pid, k in zip(r.prompt_ids, r.response_idx)]
    assert r.prompt_tokens[0] == prompt_token_ids(tok, "Say hello to the world in a short sentence.")
    assert [int(n) for n in r.mask.sum(1)] == [len(t) for t in r.response_tokens]
    # the sampling policy's log-probs are those of its tokens; the reference is the same model: KL 0
    want = sequence_logprobs(model, r.prompt_tokens, r.response_tokens, tok.pad_token_id, 1.0).detach()
    torch.testing.assert_close(r.logprobs.sum(1), want, rtol=1e-5, atol=1e-4)
    assert r.kl.abs().max().item() < 1e-4
    assert r.groups(r.rewards).shape == (3, 2)
    table = r.table()
    assert table.schema == ROLLOUTS and table.num_rows == 6
    assert table.column("step").to_pylist() == [5] * 6
    assert [len(x) for x in table.column("logprobs").to_pylist()] == [len(t) for t in r.response_tokens]
    again = collect_rollouts(model, model, tok, PROMPTS, SAMPLING, scorers, seed=3, step=5, missing_eos_penalty=None,
                             logprob_batch_size=4)
    assert again.table().equals(table)
    other = collect_rollouts(model, None, tok, PROMPTS, SAMPLING, scorers, seed=3, step=6, missing_eos_penalty=None,
                             logprob_batch_size=4)
    assert set(other.seeds).isdisjoint(r.seeds)
    assert other.ref_logprobs.abs().sum().item() == 0  # no reference: no KL term


def test_the_missing_eos_penalty_lowers_the_reward_of_cut_responses_only(tiny_policy, scorers):
    model, tok = tiny_policy
    r = collect_rollouts(model, model, tok, PROMPTS, SAMPLING, scorers, seed=3, step=5, missing_eos_penalty=2.0,
                         logprob_batch_size=4)
    cut = torch.tensor([f == "length" for f in r.finish_reasons])
    assert cut.any()  # a random tiny policy rarely ends within 6 tokens
    torch.testing.assert_close(r.rewards, r.scores - 2.0 * cut.double())
