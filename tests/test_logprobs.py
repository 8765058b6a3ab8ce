import pytest
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import (check_context_length, length_grouped_batches, pad_sequences, pair_logprobs,
                                   response_kl, sequence_logprobs)


def reference_logprob(model, prompt, response, temperature):
    """One row, no padding, full log_softmax: the definition."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float() / temperature, -1)
    return sum(logps[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))


def test_dynamic_padding_gives_the_unpadded_log_probs(tiny_policy):
    model, tok = tiny_policy
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]
    responses = [[20, 21, 2], [30, 31, 32, 33, 34, 2], [2]]
    with torch.no_grad():
        got = sequence_logprobs(model, prompts, responses, pad_id=tok.pad_token_id, temperature=0.7)
    want = [reference_logprob(model, p, r, 0.7) for p, r in zip(prompts, responses)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)
    assert (got < 0).all()


def reference_kl(policy, reference, prompt, response, temperature):
    """One row, no padding: Σ over response positions of Σ_v p(v) (log p(v) − log q(v))."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp, logq = (torch.log_softmax(m(input_ids=ids).logits[0, :-1].float() / temperature, -1)
                      for m in (policy, reference))
    rows = range(len(prompt) - 1, len(prompt) - 1 + len(response))
    return sum((logp[t].exp() * (logp[t] - logq[t])).sum().item() for t in rows)


def test_response_kl_is_the_summed_full_vocabulary_kl(tiny_policy):
    import copy

    model, tok = tiny_policy
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]
    responses = [[20, 21, 2], [30, 31, 32, 33, 34, 2], [2]]
    got = response_kl(other, model, prompts, responses, tok.pad_token_id, 0.7, batch_size=2, progress=False)
    want = [reference_kl(other, model, p, r, 0.7) for p, r in zip(prompts, responses)]
    assert got["kl"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert all(k > 0 for k in got["kl"])
    assert got["policy"] == pytest.approx([reference_logprob(other, p, r, 0.7) for p, r in zip(prompts, responses)],
                                          abs=1e-4)
    assert got["reference"] == pytest.approx([reference_logprob(model, p, r, 0.7)
                                              for p, r in zip(prompts, responses)], abs=1e-4)
    same = response_kl(model, model, prompts, responses, tok.pad_token_id, 0.7, batch_size=2, progress=False)
    assert same["kl"] == pytest.approx([0.0] * 3, abs=1e-5)


def test_gradients_reach_the_parameters(tiny_policy):
    model, tok = tiny_policy
    model.zero_grad()
    sequence_logprobs(model, [[1, 5, 6]], [[7, 2]], pad_id=tok.pad_token_id).sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_padding_and_masks():
    ids, attn, resp = pad_sequences([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert resp.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]


def test_length_grouping():
    assert length_grouped_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]


def test_pair_logprobs_match_per_row_computation(tiny_policy):
    model, tok = tiny_policy
    prompts, chosen, rejected = [[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 11, 2]], [[12, 2], [2]]
    c, r = pair_logprobs(model, prompts, chosen, rejected, tok.pad_token_id, 0.8, batch_size=3, progress=False)
    assert c == pytest.approx([reference_logprob(model, p, x, 0.8) for p, x in zip(prompts, chosen)], abs=1e-4)
    assert r == pytest.approx([reference_logprob(model, p, x, 0.8) for p, x in zip(prompts, rejected)], abs=1e-4)


def test_context_length_checked_before_any_forward():
    check_context_length([10, 2048], 2048, "pairs.parquet")
    with pytest.raises(PipelineError, match="pairs.parquet: row 1 has 2049 tokens, more than the model's context of 2048"):
        check_context_length([10, 2049], 2048, "pairs.parquet")
