"""Evaluation statistics (bootstrap intervals, win rate) and the evaluate stage's library on a tiny model."""

import numpy as np
import pyarrow as pa
import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.evaluation import (compare_with_base, iteration_rows, paired_comparison,
                                      per_prompt_means, reward_histogram, sample_and_score)
from rlhf_pipeline.intervals import bootstrap_mean_ci
from rlhf_pipeline.params import EvaluateParams, GenerateParams, RewardParams


def test_bootstrap_is_seeded_and_contains_the_mean():
    values = np.random.default_rng(0).normal(0.3, 1.0, size=50)
    a = bootstrap_mean_ci(values, 2000, 0.95, seed=5)
    assert a == bootstrap_mean_ci(values, 2000, 0.95, seed=5)
    assert a != bootstrap_mean_ci(values, 2000, 0.95, seed=6)
    low, high = a
    assert low < values.mean() < high
    # Roughly mean ± 1.96 standard errors for a normal sample.
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    narrow = bootstrap_mean_ci(values, 2000, 0.5, seed=5)
    assert low < narrow[0] < narrow[1] < high
    with pytest.raises(PipelineError, match="no values: the held-out set is empty"):
        bootstrap_mean_ci(np.array([]), 100, 0.95, 0)


def test_paired_comparison_win_rate_counts_ties_half():
    base = np.array([0.0, 0.5, 1.0, 0.5])
    trained = np.array([1.0, 0.5, 0.0, 1.0])
    out = paired_comparison(base, trained, 1000, 0.95, seed=1)
    assert out["win_rate"]["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (out["win_rate"]["wins"], out["win_rate"]["ties"], out["win_rate"]["losses"]) == (2, 1, 1)
    assert out["reward"]["diff"] == pytest.approx(0.125)
    assert out["reward"]["diff_ci_low"] <= 0.125 <= out["reward"]["diff_ci_high"]
    same = paired_comparison(base, base, 1000, 0.95, seed=1)
    assert same["reward"]["diff_ci_low"] == same["reward"]["diff_ci_high"] == 0.0
    assert same["win_rate"]["value"] == 0.5


def test_per_prompt_means_follow_the_given_order():
    out = per_prompt_means(["b", "a", "b", "a"], [1.0, 0.0, 0.0, 0.5], ["a", "b"])
    assert out.tolist() == [0.25, 0.5]


def test_sampling_defaults_to_generate_and_allows_greedy():
    gen = GenerateParams(temperature=0.7, top_p=0.95, max_new_tokens=99)
    s = EvaluateParams(temperature=None).sampling(gen)  # null: as generate
    assert (s.num_responses, s.temperature, s.top_p, s.max_new_tokens) == (1, 0.7, 0.95, 99)
    g = EvaluateParams(temperature=0, num_responses=2, max_new_tokens=5).sampling(gen)
    assert (g.num_responses, g.temperature, g.max_new_tokens) == (2, 0.0, 5)


@pytest.fixture(scope="module")
def test_prompts():
    from rlhf_pipeline.data import load_ifeval, split_prompts

    return split_prompts(load_ifeval(), 7, 3, 1, seed=0).test


def evaluate_against_base(base_dir, policy_dir, prompts, gen, reward, cfg, seed):
    """What the evaluate_base and evaluate stages do, in one call."""
    base, _ = sample_and_score(base_dir, prompts, cfg.sampling(gen), reward, seed, "test prompts")
    return compare_with_base(base, base_dir, policy_dir, prompts, gen, reward, cfg, seed, "test prompts")


def test_evaluate_policy_against_itself(tiny_model_dir, test_prompts):
    """The same model as base and trained: identical responses (same seeds), zero KL, win rate 0.5."""
    cfg = EvaluateParams(num_responses=2, max_new_tokens=8, bootstrap_samples=200, logprob_batch_size=3)
    gen = GenerateParams(dtype="float32", batch_size=8)
    table, m = evaluate_against_base(tiny_model_dir, tiny_model_dir, test_prompts, gen, Scorers(RewardParams()), cfg, seed=3)
    assert table.num_rows == 6
    assert table.column("base_response").to_pylist() == table.column("trained_response").to_pylist()
    assert all(abs(x) < 1e-4 for x in table.column("kl_log_ratio").to_pylist())
    assert all(abs(x) < 1e-4 for x in table.column("kl").to_pylist())
    assert all(x < 0 for x in table.column("trained_logprob").to_pylist())
    assert m["win_rate"]["value"] == 0.5 and m["win_rate"]["ties"] == 3
    timing = ("generation_seconds", "tokens_per_second", "score_seconds")
    assert m["reward"]["diff"] == 0.0
    assert {k: v for k, v in m["base"].items() if k not in timing} == {k: v for k, v in m["trained"].items()
                                                                       if k not in timing}
    hist = reward_histogram(table)
    assert sum(r["base"] for r in hist) == sum(r["trained"] for r in hist) == 6
    rows = iteration_rows({"iter_1": m, "iter_2": m})
    assert [r["iteration"] for r in rows] == [1, 2] and rows[0]["reward_diff"] == 0 and rows[1]["kl_mean"] == m["kl"]["mean"]
    # Base responses made with other seeds (or for other prompts) are refused, not compared.
    other, _ = sample_and_score(tiny_model_dir, test_prompts, cfg.sampling(gen), Scorers(RewardParams()), 4, "test prompts")
    with pytest.raises(PipelineError, match="rerun evaluate_base"):
        compare_with_base(other, tiny_model_dir, tiny_model_dir, test_prompts, gen, Scorers(RewardParams()), cfg, 3, "x")
    # Greedy decoding: both responses of a prompt are the same.
    greedy, _ = evaluate_against_base(tiny_model_dir, tiny_model_dir, test_prompts, gen, Scorers(RewardParams()),
                                      EvaluateParams(num_responses=2, temperature=0, max_new_tokens=8,
                                                     bootstrap_samples=200), seed=3)
    texts = greedy.column("base_response").to_pylist()
    assert texts[0::2] == texts[1::2]


def test_no_test_prompts_is_an_error_before_generation(tiny_model_dir, test_prompts):
    with pytest.raises(PipelineError, match="test prompts: no prompts"):
        sample_and_score("/nonexistent", test_prompts.slice(0, 0), GenerateParams(), Scorers(RewardParams()), 0, "test prompts")
    bad = pa.table({"prompt_id": ["x"], "prompt": ["hi"]})  # IFEval scorer needs its columns
    with pytest.raises(PipelineError, match="instruction_id_list"):
        sample_and_score("/nonexistent", bad, GenerateParams(), Scorers(RewardParams()), 0, "test prompts")
