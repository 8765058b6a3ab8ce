import sys
import types

import pytest
import torch

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.schemas import GENERATIONS as GENERATIONS_SCHEMA
from rlhf_pipeline.generation import (generate_transformers,
                                      generate_vllm, response_seed, response_token_ids, responses_table)
from rlhf_pipeline.params import GenerateParams, SamplingParams

PROMPTS = [("p-short", "Say hi."), ("p-long", "Write a haiku about the sea, then explain it in one line."),
           ("p-mid", "Name three colours.")]


def test_response_seed_is_stable_and_distinct():
    seeds = {response_seed(42, pid, k) for pid in ("a", "b") for k in range(4)}
    assert len(seeds) == 8
    assert response_seed(42, "a", 0) == response_seed(42, "a", 0) != response_seed(43, "a", 0)
    assert all(0 <= s < 2**31 for s in seeds)


def test_response_token_ids_end_with_eos_only_where_it_was_generated():
    assert response_token_ids([5, 6, 2, 2, 2], {2}) == ([5, 6, 2], "stop")
    assert response_token_ids([5, 6, 7], {2}) == ([5, 6, 7], "length")  # cut: no EOS appended
    assert response_token_ids([2, 2], [2]) == ([2], "stop")


def test_generate_rows_seeds_and_lengths(tiny_policy):
    model, tok = tiny_policy
    cfg = GenerateParams(num_responses=3, max_new_tokens=6, batch_size=4)
    rows = generate_transformers(model, tok, PROMPTS, cfg, seed=11, progress=False)
    assert sorted((r.prompt_id, r.response_idx) for r in rows) == sorted((p, k) for p, _ in PROMPTS for k in range(3))
    for r in rows:
        assert r.seed == response_seed(11, r.prompt_id, r.response_idx)
        assert 1 <= r.num_tokens <= 6 and r.finish_reason in {"stop", "length"}
        assert (r.num_tokens == 6) or r.finish_reason == "stop"
        # the ids as sampled: the stop token (id 2) ends a stopped response and appears nowhere else
        assert len(r.token_ids) == r.num_tokens and (r.token_ids[-1] == 2) == (r.finish_reason == "stop")
        assert 2 not in r.token_ids[:-1]
        text_ids = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
        assert r.response == tok.decode(text_ids, skip_special_tokens=True)
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
            # As vLLM answers: a response that stopped on EOS ends with it (rows 0 and 2), except
            # where an engine leaves it out and names it in stop_reason (row 2 here).
            outs = [dict(token_ids=[10, 2], finish_reason="stop", stop_reason=None),
                    dict(token_ids=[10, 11], finish_reason="length", stop_reason=None),
                    dict(token_ids=[10, 11], finish_reason="stop", stop_reason=2),
                    dict(token_ids=[10, 11, 12, 13], finish_reason="length", stop_reason=None)]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"r{i}", **o)])
                    for i, o in enumerate(outs[:len(requests)])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    tok = load_tokenizer(tiny_model_dir)
    cfg = GenerateParams(backend="vllm", num_responses=2, max_new_tokens=9, tensor_parallel_size=2)
    rows = generate_vllm(tiny_model_dir, tok, PROMPTS[:2], cfg, seed=4, dtype="bfloat16")
    assert calls["llm"]["tensor_parallel_size"] == 2 and calls["llm"]["enable_prefix_caching"]
    assert calls["llm"]["generation_config"] == "vllm"  # the model folder's defaults stay out
    assert len(calls["requests"]) == 4
    assert calls["requests"][0]["prompt_token_ids"] == prompt_token_ids(tok, PROMPTS[0][1])
    for p, r in zip(calls["params"], rows):
        assert p.kw["n"] == 1 and p.kw["max_tokens"] == 9 and p.kw["seed"] == r.seed
        assert r.seed == response_seed(4, r.prompt_id, r.response_idx)
        assert p.kw["stop_token_ids"] == [2]
    assert [r.finish_reason for r in rows] == ["stop", "length", "stop", "length"]
    assert [r.token_ids for r in rows] == [[10, 2], [10, 11], [10, 11, 2], [10, 11, 12, 13]]
    assert [r.num_tokens for r in rows] == [2, 2, 3, 4]


def test_vllm_missing_is_a_clear_error(tiny_model_dir, monkeypatch):
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.models import load_tokenizer

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(PipelineError, match=r"backend 'vllm' \(generate.backend, online.backend\): vLLM is not installed"):
        generate_vllm(tiny_model_dir, load_tokenizer(tiny_model_dir), PROMPTS, GenerateParams(backend="vllm"), 0, "auto")


def manual_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: the argmax of a full forward pass, step by step, stopping at EOS."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == 2:
                break
    return out


def test_model_generation_config_does_not_leak_into_sampling(tiny_model_dir, tmp_path):
    """A model folder whose generation_config.json asks for other settings is sampled with exactly
    the stage's settings: greedy equals a manual greedy decode, and sampled responses equal those
    of the same weights without that file."""
    import json
    import shutil

    from rlhf_pipeline.models import load_policy, load_tokenizer

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    cfg_file = odd / "generation_config.json"
    gen = json.loads(cfg_file.read_text())
    gen.update(repetition_penalty=50.0, top_k=1, temperature=0.1, do_sample=True, no_repeat_ngram_size=1,
               min_new_tokens=3)
    cfg_file.write_text(json.dumps(gen))
    tok = load_tokenizer(odd)
    model = load_policy(odd, torch.float32, torch.device("cpu"))
    assert model.generation_config.repetition_penalty == 50.0

    greedy = SamplingParams(num_responses=1, max_new_tokens=10, temperature=0, batch_size=4)
    rows = generate_transformers(model, tok, PROMPTS, greedy, seed=0, progress=False)
    for r in rows:
        prompt = prompt_token_ids(tok, dict(PROMPTS)[r.prompt_id])
        assert r.token_ids == manual_greedy(model, prompt, 10), r.prompt_id

    plain = load_policy(tiny_model_dir, torch.float32, torch.device("cpu"))
    cfg = GenerateParams(num_responses=2, max_new_tokens=10, batch_size=6)
    with_file = generate_transformers(model, tok, PROMPTS, cfg, seed=9, progress=False)
    without = generate_transformers(plain, tok, PROMPTS, cfg, seed=9, progress=False)
    assert [r.token_ids for r in with_file] == [r.token_ids for r in without]
