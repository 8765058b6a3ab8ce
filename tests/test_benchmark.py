"""The standard IFEval benchmark's figures and their paired intervals, on hand-computed tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rlhf_pipeline import benchmark
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.intervals import bootstrap_ci, bootstrap_mean_ci

T, F = True, False
# three prompts with 1, 2 and 3 instructions
BASE = {"strict": [[F], [T, F], [T, T, T]], "loose": [[T], [T, F], [T, T, T]]}
TRAINED = {"strict": [[T], [T, T], [T, F, T]], "loose": [[T], [T, T], [T, T, T]]}


def table(verdicts, ids=("a", "b", "c")):
    return pa.table({"prompt_id": list(ids),
                     **{f"ifeval_followed_{m}": pa.array(verdicts[m], pa.list_(pa.bool_())) for m in ("strict", "loose")}})


def test_four_accuracies_and_the_card_average_by_hand():
    got = benchmark.scores(table(BASE))
    want = {"prompt_level_strict": 1 / 3, "instruction_level_strict": 4 / 6, "prompt_level_loose": 2 / 3,
            "instruction_level_loose": 5 / 6, "card_average": (1 / 3 + 4 / 6) / 2}
    assert got == pytest.approx(want, abs=1e-12)
    # the order of the rows does not matter
    reordered = table({m: list(reversed(v)) for m, v in BASE.items()}, ids=("c", "b", "a"))
    assert benchmark.scores(reordered) == pytest.approx(want, abs=1e-12)


def test_paired_differences_by_hand():
    out = benchmark.paired_differences(table(BASE), table(TRAINED), 2000, 0.95, seed=3)
    want = {"prompt_level_strict": (1 / 3, 2 / 3), "instruction_level_strict": (4 / 6, 5 / 6),
            "prompt_level_loose": (2 / 3, 1.0), "instruction_level_loose": (5 / 6, 1.0),
            "card_average": (0.5, 0.75)}
    for name, (b, t) in want.items():
        assert out[name]["base"] == pytest.approx(b, abs=1e-6)
        assert out[name]["trained"] == pytest.approx(t, abs=1e-6)
        assert out[name]["diff"] == pytest.approx(t - b, abs=1e-6)
        assert out[name]["ci_low"] <= out[name]["diff"] + 1e-9 <= out[name]["ci_high"] + 2e-9


def test_instruction_level_interval_resamples_prompts_with_their_instructions():
    """The interval of the instruction-level difference is the percentile interval of
    Σ_resampled (followed_t − followed_b) / Σ_resampled instructions, computed here by a loop."""
    samples, seed = 300, 11
    out = benchmark.paired_differences(table(BASE), table(TRAINED), samples, 0.9, seed)
    diff = np.array([1 - 0, 2 - 1, 2 - 3], float)  # followed (strict) per prompt, trained − base
    n = np.array([1, 2, 3], float)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, 3, size=(samples, 3))
    ratios = [diff[row].sum() / n[row].sum() for row in idx]
    low, high = np.quantile(ratios, [0.05, 0.95])
    assert (out["instruction_level_strict"]["ci_low"], out["instruction_level_strict"]["ci_high"]) == \
        pytest.approx((low, high), abs=1e-6)


def test_bootstrap_ci_of_a_mean_is_bootstrap_mean_ci():
    values = np.array([0.0, 1.0, 0.5, 0.25, 1.0])
    assert bootstrap_ci(lambda idx: values[idx].mean(axis=1), values.size, 500, 0.95, 4) == \
        pytest.approx(bootstrap_mean_ci(values, 500, 0.95, 4), abs=1e-12)
    with pytest.raises(PipelineError, match="bootstrap over no values"):
        bootstrap_ci(lambda idx: idx, 0, 10, 0.95, 0)


def test_the_same_policy_differs_by_exactly_zero():
    out = benchmark.paired_differences(table(BASE), table(BASE), 500, 0.95, 0)
    assert all(v["diff"] == v["ci_low"] == v["ci_high"] == 0 for v in out.values())


def test_tables_must_answer_the_same_prompts_once():
    with pytest.raises(PipelineError, match="different prompts"):
        benchmark.paired_differences(table(BASE), table(TRAINED, ids=("a", "b", "d")), 100, 0.95, 0)
    twice = table({m: v[:2] + v[:1] for m, v in BASE.items()}, ids=("a", "b", "a"))
    with pytest.raises(PipelineError, match="one \\(greedy\\) response per prompt"):
        benchmark.scores(twice)


def test_benchmark_prompts_are_the_whole_set_or_a_seeded_subset():
    full = benchmark.benchmark_prompts(None, 0)
    assert full.num_rows == 541 and len(set(full.column("prompt_id").to_pylist())) == 541
    assert full.column("prompt_id").to_pylist() == sorted(full.column("prompt_id").to_pylist())
    sub = benchmark.benchmark_prompts(10, 5)
    assert sub.num_rows == 10 and sub.equals(benchmark.benchmark_prompts(10, 5))
    assert set(sub.column("prompt_id").to_pylist()) < set(full.column("prompt_id").to_pylist())
    assert sub.column_names == full.column_names
    with pytest.raises(PipelineError, match="benchmark.num_prompts: 600 requested but IFEval has 541"):
        benchmark.benchmark_prompts(600, 0)


def test_sampling_is_greedy_with_the_benchmark_limit():
    from rlhf_pipeline.params import BenchmarkParams, GenerateParams

    s = BenchmarkParams(max_new_tokens=99, batch_size=3).sampling(GenerateParams(dtype="float32"))
    assert (s.temperature, s.top_p, s.num_responses, s.max_new_tokens, s.batch_size, s.dtype) == \
        (0.0, 1.0, 1, 99, 3, "float32")
