import sys
import types

import pytest
import torch
from transformers import TopPLogitsWarper

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.generation import (GENERATIONS_SCHEMA, Response, SeededSampler, _split_response,
                                      generate_transformers, generate_vllm, response_seed, responses_table)
from rlhf_pipeline.params import GenerateParams

PROMPTS = [("p-short", "Say hi."), ("p-long", "Write a haiku about the sea, then explain it in one line."),
           ("p-mid", "Name three colours.")]


def test_response_seed_is_stable_and_distinct():
    seeds = {response_seed(42, pid, k) for pid in ("a", "b") for k in range(4)}
    assert len(seeds) == 8
    assert response_seed(42, "a", 0) == response_seed(42, "a", 0) != response_seed(43, "a", 0)
    assert all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_nucleus_is_the_set_transformers_keeps(top_p):
    torch.manual_seed(0)
    scores = torch.randn(6, 500) * 3
    sampler = SeededSampler([0] * 6, temperature=0.7, top_p=top_p, device=torch.device("cpu"), first_k=4)
    top, ids = sampler.nucleus(scores)
    hf = TopPLogitsWarper(top_p)(None, scores / 0.7)
    for row in range(6):
        ours = set(ids[row][top[row] > 0].tolist())
        assert ours == set(torch.nonzero(hf[row] > float("-inf")).flatten().tolist())
        probs = torch.softmax(scores[row] / 0.7, -1)
        torch.testing.assert_close(top[row][top[row] > 0], probs[ids[row][top[row] > 0]])


def test_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    target = torch.softmax(logits / 0.8, -1)[0]
    counts = torch.zeros(4)
    for s in range(4000):
        out = SeededSampler([s], 0.8, 1.0, torch.device("cpu"))(None, logits)
        assert (out == 0).sum() == 1 and torch.isinf(out).sum() == 3
        counts[out[0].argmax()] += 1
    torch.testing.assert_close(counts / 4000, target, atol=0.025, rtol=0)


def test_sampler_rows_use_their_own_generators():
    logits = torch.zeros(3, 1000)
    alone = SeededSampler([7], 1.0, 1.0, torch.device("cpu"))(None, logits[:1]).argmax(-1)
    batch = SeededSampler([1, 7, 2], 1.0, 1.0, torch.device("cpu"))(None, logits).argmax(-1)
    assert batch[1] == alone[0]


def test_split_response_stops_at_first_stop_token():
    assert _split_response([5, 6, 2, 2, 2], {2}) == ([5, 6, 2], True)
    assert _split_response([5, 6, 7], {2}) == ([5, 6, 7], False)
    assert _split_response([2, 2], {2}) == ([2], True)


def test_generate_rows_seeds_and_lengths(tiny_policy):
    model, tok = tiny_policy
    cfg = GenerateParams(num_responses=3, max_new_tokens=6, batch_size=4)
    rows = generate_transformers(model, tok, PROMPTS, cfg, seed=11, progress=False)
    assert sorted((r.prompt_id, r.response_idx) for r in rows) == sorted((p, k) for p, _ in PROMPTS for k in range(3))
    for r in rows:
        assert r.seed == response_seed(11, r.prompt_id, r.response_idx)
        assert 1 <= r.num_tokens <= 6 and r.finish_reason in {"stop", "length"}
        assert (r.num_tokens == 6) or r.finish_reason == "stop"
    assert len({r.response for r in rows}) > 3  # sampling, not greedy copies
    table = responses_table(rows)
    assert table.schema == GENERATIONS_SCHEMA
    assert table.column("prompt_id").to_pylist() == sorted(table.column("prompt_id").to_pylist())


def test_a_response_depends_on_its_seed_not_its_batch(tiny_policy):
    model, tok = tiny_policy
    cfg = GenerateParams(num_responses=2, max_new_tokens=8, batch_size=6)
    together = {(r.prompt_id, r.response_idx): r.response
                for r in generate_transformers(model, tok, PROMPTS, cfg, seed=5, progress=False)}
    alone = {(r.prompt_id, r.response_idx): r.response
             for r in generate_transformers(model, tok, PROMPTS[1:2], cfg.model_copy(update={"batch_size": 2}),
                                            seed=5, progress=False)}
    assert alone == {k: v for k, v in together.items() if k[0] == "p-long"}
    again = {(r.prompt_id, r.response_idx): r.response
             for r in generate_transformers(model, tok, PROMPTS, cfg, seed=5, progress=False)}
    assert again == together


def test_shared_prefill_matches_plain_generate(tiny_policy):
    """With one prompt and no padding, our path equals generate() on N copies with the same sampler."""
    from transformers import GenerationConfig

    model, tok = tiny_policy
    cfg = GenerateParams(num_responses=2, max_new_tokens=5, batch_size=2)
    ours = generate_transformers(model, tok, PROMPTS[:1], cfg, seed=3, progress=False)
    ids = torch.tensor([prompt_token_ids(tok, PROMPTS[0][1])] * 2)
    seeds = [response_seed(3, "p-short", k) for k in range(2)]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=[
        SeededSampler(seeds, cfg.temperature, cfg.top_p, torch.device("cpu"))],
        generation_config=GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=[2], pad_token_id=2))
    plain = [out[k, ids.shape[1]:].tolist() for k in range(2)]
    for r in sorted(ours, key=lambda r: r.response_idx):
        tokens = plain[r.response_idx]
        tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
        assert r.response == tok.decode(tokens, skip_special_tokens=True)


def test_vllm_backend_one_seeded_request_per_response(tiny_model_dir, monkeypatch):
    """vLLM is GPU-only here: a stand-in module records what our backend asks of its API."""
    from rlhf_pipeline.models import load_tokenizer

    calls = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
                hf_config=types.SimpleNamespace(eos_token_id=2)))

        def generate(self, requests, sampling_params, use_tqdm):
            calls["requests"], calls["params"] = requests, sampling_params
            done = lambda i: types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text=f"r{i}", token_ids=list(range(i + 1)), finish_reason="length" if i % 2 else "stop")])
            return [done(i) for i in range(len(requests))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    tok = load_tokenizer(tiny_model_dir)
    cfg = GenerateParams(backend="vllm", num_responses=2, max_new_tokens=9, tensor_parallel_size=2)
    rows = generate_vllm(tiny_model_dir, tok, PROMPTS[:2], cfg, seed=4, dtype="bfloat16")
    assert calls["llm"]["tensor_parallel_size"] == 2 and calls["llm"]["enable_prefix_caching"]
    assert len(calls["requests"]) == 4
    assert calls["requests"][0]["prompt_token_ids"] == prompt_token_ids(tok, PROMPTS[0][1])
    for p, r in zip(calls["params"], rows):
        assert p.kw["n"] == 1 and p.kw["max_tokens"] == 9 and p.kw["seed"] == r.seed
        assert r.seed == response_seed(4, r.prompt_id, r.response_idx)
        assert p.kw["stop_token_ids"] == [2]
    assert [r.finish_reason for r in rows] == ["stop", "length", "stop", "length"]
    assert [r.num_tokens for r in rows] == [1, 2, 3, 4]


def test_vllm_missing_is_a_clear_error(tiny_model_dir, monkeypatch):
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.models import load_tokenizer

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(PipelineError, match="generate.backend: 'vllm' is not installed"):
        generate_vllm(tiny_model_dir, load_tokenizer(tiny_model_dir), PROMPTS, GenerateParams(backend="vllm"), 0, "auto")
