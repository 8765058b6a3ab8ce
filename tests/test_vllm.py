"""The real vLLM engine (``generate.backend: vllm``) on a tiny Llama saved to disk, on CPU.

Runs in the vLLM environment (``make venv-vllm``; CI: ``.venv-vllm/bin/python -m pytest tests/test_vllm.py``
with ``RLHF_REQUIRE_VLLM=1``); the default environment has no vLLM and skips the module. One engine
serves the module (each start takes about a minute on two cores).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("RLHF_REQUIRE_VLLM"):
        raise ImportError("RLHF_REQUIRE_VLLM is set but vLLM is not installed (make venv-vllm)")
    pytest.skip("vLLM is not installed here (make venv-vllm)", allow_module_level=True)

import torch  # noqa: E402
from conftest import tiny_llama_config  # noqa: E402

from rlhf_pipeline.generation import (generate_transformers, generate_vllm, response_seed,  # noqa: E402
                                      responses_table, stop_token_ids, vllm_engine)
from rlhf_pipeline.params import GenerateParams, SamplingParams  # noqa: E402
from rlhf_pipeline.schemas import GENERATIONS  # noqa: E402

PROMPTS = [(f"p{i}", text) for i, text in enumerate([
    "Write a haiku about rain.", "List three fruits, without commas.", "Say hello in French.",
    "Explain gravity to a child in two sentences.", "Name a prime number larger than ten.",
    "Write a title in double angular brackets, such as <<title>>."])]


def vllm_tiny_model(raw_tiny_model_dir, tmp_path_factory, name: str, **config):
    """A tiny Llama vLLM's CPU attention accepts (head size 64; the shared fixture's 16 is not), with
    the shared fixture's tokenizer, prepared as models/base is."""
    from transformers import LlamaForCausalLM

    from rlhf_pipeline.models import prepare_base_model

    raw = tmp_path_factory.mktemp(f"raw_{name}")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                       num_key_value_heads=1, **config)).save_pretrained(raw)
    for f in raw_tiny_model_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            (raw / f.name).write_bytes(f.read_bytes())
    out = tmp_path_factory.mktemp(name) / "base"
    prepare_base_model(str(raw), out)
    return out


@pytest.fixture(scope="module")
def vllm_model_dir(raw_tiny_model_dir, tmp_path_factory):
    return vllm_tiny_model(raw_tiny_model_dir, tmp_path_factory, "vllm_base")


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    # on a CPU the "GPU" memory share is the host memory vLLM reserves for its KV cache: a tiny model
    # needs little, and a test beside other processes must not ask for 90 % of the machine
    return vllm_engine(vllm_model_dir, "float32", seed=0, gpu_memory_utilization=0.25)


@pytest.fixture(scope="module")
def tokenizer(vllm_model_dir):
    from rlhf_pipeline.models import load_tokenizer

    return load_tokenizer(vllm_model_dir)


def sampled(engine, model_dir, tokenizer, prompts, cfg, seed=7):
    return {(r.prompt_id, r.response_idx): r
            for r in generate_vllm(model_dir, tokenizer, prompts, cfg, seed, "float32", llm=engine)}


def test_generations_have_the_schema_seeds_and_token_rule_of_the_transformers_backend(engine, vllm_model_dir,
                                                                                       tokenizer):
    cfg = GenerateParams(backend="vllm", num_responses=2, max_new_tokens=12, temperature=0.8, top_p=0.9)
    rows = sampled(engine, vllm_model_dir, tokenizer, PROMPTS, cfg)
    table = responses_table(list(rows.values()))
    assert table.schema.equals(GENERATIONS, check_metadata=False) and table.num_rows == 12
    stop = set(stop_token_ids(tokenizer, engine.llm_engine.model_config.hf_config))
    for (pid, k), r in rows.items():
        assert r.seed == response_seed(7, pid, k)
        assert r.num_tokens == len(r.token_ids) and r.token_ids
        # the rule of generation.response_token_ids: a stop token only as the last id, and only on "stop"
        assert not stop & set(r.token_ids[:-1])
        assert (r.finish_reason == "stop") == (r.token_ids[-1] in stop)
        assert r.finish_reason == "stop" or len(r.token_ids) == cfg.max_new_tokens
        assert r.response == tokenizer.decode([t for t in r.token_ids if t not in stop], skip_special_tokens=True)


def test_the_same_seeds_give_the_same_tokens_on_a_rerun_and_in_another_batch(engine, vllm_model_dir, tokenizer):
    """float32: each response depends on its own seed and prompt only (not on the batch it shares)."""
    cfg = GenerateParams(backend="vllm", num_responses=2, max_new_tokens=16, temperature=1.0, top_p=0.9)
    first = sampled(engine, vllm_model_dir, tokenizer, PROMPTS, cfg)
    again = sampled(engine, vllm_model_dir, tokenizer, PROMPTS, cfg)
    other_batch = sampled(engine, vllm_model_dir, tokenizer, [PROMPTS[4], PROMPTS[1]], cfg)
    assert {k: r.token_ids for k, r in again.items()} == {k: r.token_ids for k, r in first.items()}
    for key, r in other_batch.items():
        assert r.token_ids == first[key].token_ids, key
    # and the seed matters: the two responses of a prompt differ
    assert sum(first[(pid, 0)].token_ids != first[(pid, 1)].token_ids for pid, _ in PROMPTS) >= 5


def test_greedy_vllm_equals_greedy_transformers_up_to_near_ties(engine, vllm_model_dir, tokenizer):
    """Greedy decoding in both backends on the same float32 weights gives the same token ids; where
    float rounding flips the argmax, the two candidates were a near-tie of the logits."""
    from rlhf_pipeline.chat import prompt_token_ids
    from rlhf_pipeline.models import load_policy

    cfg = SamplingParams(backend="vllm", num_responses=1, max_new_tokens=16, temperature=0.0, top_p=1.0)
    ours = sampled(engine, vllm_model_dir, tokenizer, PROMPTS, cfg)
    model = load_policy(vllm_model_dir, torch.float32, torch.device("cpu"))
    theirs = {(r.prompt_id, r.response_idx): r for r in generate_transformers(
        model, tokenizer, PROMPTS, cfg.model_copy(update={"backend": "transformers"}), 7, progress=False)}
    same = 0
    for key, r in ours.items():
        a, b = r.token_ids, theirs[key].token_ids
        if a == b:
            same += 1
            continue
        i = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        ids = torch.tensor([prompt_token_ids(tokenizer, dict(PROMPTS)[key[0]]) + b[:i]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        gap = (logits[b[i]] - logits[a[i]]).abs().item()
        assert gap < 1e-3 * max(1.0, logits.abs().max().item()), (key, i, gap)
    assert same >= len(PROMPTS) // 2, f"only {same} of {len(PROMPTS)} greedy responses agree"


def test_weights_synced_into_the_engine_are_those_it_samples_from(vllm_model_dir, tokenizer):
    """An online policy after an update (here: every weight scaled by a seeded perturbation, the
    tied embedding first alone, then all) synced into a running in-process engine
    (``generation.sync_vllm_weights``): vLLM's next-token log-probs become the updated policy's
    (transformers, float32), and its greedy answers the updated policy's up to near-ties."""
    from vllm import SamplingParams as VllmSamplingParams

    from rlhf_pipeline.chat import prompt_token_ids
    from rlhf_pipeline.generation import sync_vllm_weights
    from rlhf_pipeline.models import load_policy

    llm = vllm_engine(vllm_model_dir, "float32", seed=0, gpu_memory_utilization=0.1, in_process=True)
    model = load_policy(vllm_model_dir, torch.float32, torch.device("cpu"))
    ids = [prompt_token_ids(tokenizer, text) for _, text in PROMPTS]
    top = VllmSamplingParams(temperature=0.0, max_tokens=1, logprobs=5)

    def vllm_top5():
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], top, use_tqdm=False)
        return [sorted((lp.logprob, t) for t, lp in o.outputs[0].logprobs[0].items())[::-1] for o in outs]

    def policy_top5():
        out = []
        with torch.no_grad():
            for i in ids:
                values, tokens = torch.log_softmax(model(input_ids=torch.tensor([i])).logits[0, -1], -1).topk(5)
                out.append(list(zip(values.tolist(), tokens.tolist())))
        return out

    def assert_same(a, b):
        for x, y in zip(a, b):
            assert [t for _, t in x] == [t for _, t in y]
            assert [v for v, _ in x] == pytest.approx([v for v, _ in y], abs=1e-4)

    assert_same(vllm_top5(), policy_top5())
    before = vllm_top5()
    gen = torch.Generator().manual_seed(0)
    for part in ("embed_tokens", ""):  # the tied embedding alone (the head must follow it), then everything
        with torch.no_grad():
            for name, p in model.named_parameters():
                if part in name:
                    p.mul_(1 + 0.5 * torch.randn(p.shape, generator=gen))
        assert sync_vllm_weights(llm, model) > 0
        assert_same(vllm_top5(), policy_top5())
    assert vllm_top5() != before
    cfg = SamplingParams(backend="vllm", num_responses=1, max_new_tokens=12, temperature=0.0, top_p=1.0)
    ours = {(r.prompt_id, r.response_idx): r.token_ids
            for r in generate_vllm(vllm_model_dir, tokenizer, PROMPTS, cfg, 7, "float32", llm=llm)}
    theirs = {(r.prompt_id, r.response_idx): r.token_ids for r in generate_transformers(
        model, tokenizer, PROMPTS, cfg.model_copy(update={"backend": "transformers"}), 7, progress=False)}
    assert sum(ours[k] == theirs[k] for k in ours) >= len(PROMPTS) // 2


def test_a_weight_sync_needs_an_engine_in_this_process(engine, vllm_model_dir):
    from rlhf_pipeline.errors import PipelineError
    from rlhf_pipeline.generation import sync_vllm_weights
    from rlhf_pipeline.models import load_policy

    with pytest.raises(PipelineError, match="must run in this process"):
        sync_vllm_weights(engine, load_policy(vllm_model_dir, torch.float32, torch.device("cpu")))


@pytest.fixture(scope="module")
def peaked_vllm_model_dir(raw_tiny_model_dir, tmp_path_factory):
    """Peaked next-token distributions (weights of std 1.0), so that a reward on one word is
    learnable in a few online steps (as tests/test_online.py's policy)."""
    return vllm_tiny_model(raw_tiny_model_dir, tmp_path_factory, "peaked_vllm", initializer_range=1.0)


def test_online_rollouts_sampled_by_vllm_learn_and_rerun_to_the_same_bytes(peaked_vllm_model_dir, tmp_path,
                                                                           monkeypatch):
    """``online.backend: vllm``: every rollout step syncs the current policy into the engine, RLOO
    raises a learnable reward (a word the base policy writes in about a quarter of its responses)
    from vLLM's samples, and a second run on the same engine writes the same rollouts and weights."""
    from collections import Counter

    import pyarrow.compute as pc
    from test_online import PROMPTS as ONLINE_PROMPTS
    from test_online import ContainsTarget, online_cfg

    from rlhf_pipeline import generation
    from rlhf_pipeline.models import load_policy, load_tokenizer
    from rlhf_pipeline.online import OnlineTask
    from rlhf_pipeline.registry import ONLINE_ALGORITHMS
    from rlhf_pipeline.training import inputs_fingerprint, train_policy

    llm = vllm_engine(peaked_vllm_model_dir, "float32", seed=0, gpu_memory_utilization=0.1, in_process=True)
    tok = load_tokenizer(peaked_vllm_model_dir)
    texts = list(zip(ONLINE_PROMPTS.column("prompt_id").to_pylist(), ONLINE_PROMPTS.column("prompt").to_pylist()))
    probe = generate_vllm(None, tok, texts, SamplingParams(num_responses=8, max_new_tokens=8, temperature=1.0,
                                                           top_p=1.0), 5, "float32", llm=llm)
    counts = Counter(w for r in probe for w in set(r.response.split()))
    target = min(counts, key=lambda w: (abs(counts[w] - len(probe) / 4), w))

    syncs = []
    real_sync = generation.sync_vllm_weights
    monkeypatch.setattr(generation, "sync_vllm_weights", lambda engine, model: syncs.append(1) or real_sync(engine, model))
    cfg = online_cfg(algorithms={"rloo": {"name": "rloo", "kl_coef": 0.01}}, backend="vllm", rollout_steps=6)

    def run(out):
        reference = load_policy(peaked_vllm_model_dir, torch.float32, torch.device("cpu"))
        task = OnlineTask(ONLINE_ALGORITHMS.build(cfg.algorithms["rloo"], "online.algorithms.rloo"), ONLINE_PROMPTS,
                          tok, reference, ContainsTarget(target), cfg, None, 11, "test prompts", engine=llm)
        train_cfg = cfg.model_copy(update={"total_episodes": task.total_episodes()})
        fingerprint = inputs_fingerprint([peaked_vllm_model_dir / "model.safetensors"], cfg, 11, cfg.temperature)
        rows, _ = train_policy(peaked_vllm_model_dir, task, train_cfg, 11, out / "policy", out / "ckpt", fingerprint,
                               progress=False)
        return task.rollouts_table(), rows, (out / "policy" / "model.safetensors").read_bytes()

    first = run(tmp_path / "a")
    assert len(syncs) == cfg.rollout_steps
    rewards = [sum(first[0].filter(pc.equal(first[0].column("step"), s)).column("reward").to_pylist())
               for s in range(cfg.rollout_steps)]
    assert rewards[-1] > rewards[0] and max(rewards[-2:]) >= 2 * max(1.0, rewards[0]), (target, rewards)
    second = run(tmp_path / "b")
    assert second[0].equals(first[0]) and second[2] == first[2]


def run_stage_with_vllm(name: str, project, model_dir, **sections):
    """Run stage ``name`` as `dvc repro` would (``conftest.stage_command``, its own process and engine)
    in ``project``: ``model_dir`` as models/base, the committed params.yaml with ``generate.backend:
    vllm`` in float32 (a quarter of host memory for the KV cache) and ``sections``' keys replaced."""
    import shutil
    import subprocess

    import yaml
    from conftest import REPO, stage_command, stage_env

    shutil.copytree(model_dir, project / "models/base")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["generate"].update(backend="vllm", dtype="float32", gpu_memory_utilization=0.25)
    for section, values in sections.items():
        raw[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    (project / "stages").symlink_to(REPO / "stages")
    proc = subprocess.run(stage_command(name), cwd=project, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_generate_stage_samples_with_vllm_what_the_engine_samples(engine, vllm_model_dir, tokenizer, tmp_path):
    """`python -m stages.generate` with ``generate.backend: vllm`` (its own engine, started in the
    stage's process, as `dvc repro` runs it): the generations file has the schema, and each response
    the tokens the module's engine gives for the same seed (float32: batch-independent, above); the
    metrics name the backend."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_pipeline.params import load_params
    from rlhf_pipeline.schemas import PROMPTS as PROMPTS_SCHEMA

    (tmp_path / "data/prompts").mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": [p for p, _ in PROMPTS], "prompt": [t for _, t in PROMPTS]},
                            schema=PROMPTS_SCHEMA), tmp_path / "data/prompts/train.parquet")
    run_stage_with_vllm("generate", tmp_path, vllm_model_dir,
                        generate={"num_responses": 2, "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9},
                        data={"prompts_per_iteration": len(PROMPTS), "reuse_prompts": False})
    table = pq.read_table(tmp_path / "data/generations.parquet")
    assert table.schema.equals(GENERATIONS, check_metadata=False) and table.num_rows == 2 * len(PROMPTS)
    params = load_params(tmp_path / "params.yaml")
    metrics = json.loads((tmp_path / "metrics/generate.json").read_text())
    assert (metrics["backend"], metrics["dtype"], metrics["seed"]) == ("vllm", "float32", params.seed)
    expected = sampled(engine, vllm_model_dir, tokenizer, PROMPTS, params.generate, seed=params.seed)
    got = {(r["prompt_id"], r["response_idx"]): r for r in table.to_pylist()}
    assert set(got) == set(expected)
    for key, r in expected.items():
        assert got[key]["token_ids"] == r.token_ids and got[key]["finish_reason"] == r.finish_reason, key


def test_the_benchmark_stage_answers_greedily_with_vllm(engine, vllm_model_dir, tokenizer, tmp_path):
    """`python -m stages.benchmark_base` with ``generate.backend: vllm``: an evaluation stage samples
    through the same engine path (greedy, one response per benchmark prompt): each answer is the
    module engine's greedy answer, and the stage scores them with IFEval's checkers."""
    import json

    import pyarrow.parquet as pq

    from rlhf_pipeline.benchmark import benchmark_prompts
    from rlhf_pipeline.params import load_params

    run_stage_with_vllm("benchmark_base", tmp_path, vllm_model_dir, benchmark={"num_prompts": 3, "max_new_tokens": 8})
    metrics = json.loads((tmp_path / "metrics/benchmark/base.json").read_text())
    assert metrics["prompts"] == 3 and metrics["dtype"] == "float32"
    assert 0 <= metrics["instruction_level_loose"] <= 1 and metrics["truncated_share"] >= 0
    table = pq.read_table(tmp_path / "data/benchmark/base.parquet")
    params = load_params(tmp_path / "params.yaml")
    prompts = benchmark_prompts(3, params.seed)
    greedy = sampled(engine, vllm_model_dir, tokenizer, list(zip(prompts.column("prompt_id").to_pylist(),
                                                                 prompts.column("prompt").to_pylist())),
                     params.benchmark.sampling(params.generate), seed=params.seed)
    got = {(r["prompt_id"], r["response_idx"]): r["token_ids"] for r in table.to_pylist()}
    assert got == {key: r.token_ids for key, r in greedy.items()}
