"""`make results` (rlhf_pipeline.results): wall time per stage from dvc's output, bad profiles refused early,
and the example responses of the MLflow record chosen by rule."""

from __future__ import annotations

import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.report import example_responses
from rlhf_pipeline.results import run_results, stage_times


def test_stage_times_from_dvc_output():
    lines = [(0.0, "Running stage 'prepare_model':"), (1.0, "> python -m stages.prepare_model ..."),
             (5.0, "Stage 'benchmark_base' is cached - skipping run, checking out outputs"),
             (6.0, "Running stage 'generate@iter_1':"), (60.5, "Running stage 'report':"),
             (61.0, "Stage 'evaluate_base' didn't change, skipping")]
    assert stage_times(lines, end=70.0) == {"prepare_model": 6.0, "benchmark_base": 0.0, "generate@iter_1": 54.5,
                                            "report": 9.5, "evaluate_base": 0.0}


def test_a_bad_profile_fails_before_any_run(tmp_path):
    from conftest import REPO

    profile = tmp_path / "p.yaml"
    profile.write_text("benchmark: {max_new_tokens: 0}\n")
    with pytest.raises(PipelineError, match="benchmark.max_new_tokens"):
        run_results(REPO, profile, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PipelineError, match="cannot read the profile"):
        run_results(REPO, tmp_path / "missing.yaml", tmp_path / "out")


def test_example_responses_pick_gains_then_losses_by_prompt_id():
    columns = {"prompt_id": ["a", "b", "c", "d"], "prompt": ["pa", "pb", "pc", "pd"],
               "base_response": ["x" * 3000, "bb", "bc", "bd"], "trained_response": ["ta", "tb", "tc", "td"],
               "base_ifeval_all_loose": [False, True, False, False], "trained_ifeval_all_loose": [True, False, True, False],
               "base_num_tokens": [1, 2, 3, 4], "trained_num_tokens": [5, 6, 7, 8],
               "base_finish_reason": ["length"] * 4, "trained_finish_reason": ["stop"] * 4}
    text = example_responses(columns, gained=1, lost=1, chars=100)
    assert text.index("gained: prompt a") < text.index("lost: prompt b") and "prompt c" not in text
    assert "x" * 100 + " […]" in text and "x" * 101 not in text


def test_a_profile_switching_the_objective_replaces_it_and_keeps_other_keys():
    from conftest import REPO

    from rlhf_pipeline.repro_check import merged, profile_params

    base = {"objective": {"name": "rebel", "eta": 1.0}, "learning_rate": 6e-5}
    assert merged(base, {"objective": {"name": "dpo", "beta": 0.1}}) == {"objective": {"name": "dpo", "beta": 0.1},
                                                                       "learning_rate": 6e-5}
    assert merged(base, {"objective": {"eta": 2.0}})["objective"] == {"name": "rebel", "eta": 2.0}
    assert merged({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}
    # a null removes a mapping (one iteration fewer) and is the value null otherwise
    its = {"iterations": {"iter_1": {"prev": "base"}, "iter_2": {"prev": "iter_1"}}, "n": 16}
    assert merged(its, {"iterations": {"iter_2": None}, "n": None}) == {"iterations": {"iter_1": {"prev": "base"}},
                                                                        "n": None}
    # Every committed comparison profile is valid over the committed params.yaml.
    profiles = sorted((REPO / "envs" / "compare").glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"dpo", "grpo", "rs_sft"}
    for profile in profiles:
        profile_params(REPO, profile)


@pytest.mark.parametrize("profile, record", [("envs/results.yaml", "results"),
                                             ("envs/results_2x64_prompts.yaml", "results/dpo_2x64_prompts"),
                                             ("envs/results_3_iterations.yaml", "results/dpo_3_iterations"),
                                             ("envs/results_128_prompts.yaml", "results/dpo_128_prompts"),
                                             *[(f"envs/compare/{n}.yaml", f"results/compare/{n}")
                                               for n in ("dpo", "grpo", "rs_sft")]])
def test_a_committed_profile_still_gives_its_record_params(profile, record):
    """Every params value a recorded run's stages read (its locks) is what the profile gives over
    today's params.yaml: changing the small default does not silently change a recorded run. A key
    added to params.yaml after the record was made (not in its lock) must hold its schema default."""
    import yaml
    from conftest import REPO

    from rlhf_pipeline.repro_check import profile_params

    from rlhf_pipeline.params import Params

    defaults = Params.model_validate({"seed": 0, "iterations": {"iter_1": {"prev": "base"}},
                                      **{k: {} for k in Params.model_fields if k not in ("seed", "iterations", "plugins")}}
                                     ).model_dump()

    def plain(value):  # DVC's lock keeps PyYAML's '1e-08' strings; the profile's floats are the same number
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        try:
            return float(value) if isinstance(value, str) else value
        except ValueError:
            return value

    params = profile_params(REPO, REPO / profile)
    locks = [lock for lock in (REPO / record / "dvc.lock", REPO / record / "classic/dvc.lock",
                               REPO / record / "online/dvc.lock") if lock.exists()]
    checked = 0
    for lock in locks:
        for name, stage in yaml.safe_load(lock.read_text())["stages"].items():
            for key, value in stage.get("params", {}).get("params.yaml", {}).items():
                node, default = params, defaults
                for part in key.split("."):
                    node, default = node[part], default.get(part) if isinstance(default, dict) else None
                if isinstance(node, dict) and isinstance(value, dict) and isinstance(default, dict):
                    added = {k: node[k] for k in node.keys() - value.keys()}
                    assert added == {k: default.get(k) for k in added}, f"{record}: {name}: {key} gained {added}"
                    node = {k: v for k, v in node.items() if k in value}
                assert plain(node) == plain(value), f"{record}: {name} read {key}={value!r}; {profile} gives {node!r}"
                checked += 1
    assert locks and checked > 20


def test_the_record_holds_the_metrics_of_the_stages_that_ran_only(tmp_path):
    import yaml

    from rlhf_pipeline.results import recorded_files

    ws = tmp_path
    for rel in ["params.yaml", "metrics/eval/iter_2.json", "metrics/benchmark/final.json",
                "classic/metrics/eval/sft.json", "classic/metrics/sft.json", "online/metrics/eval/grpo.json",
                "classic/models/sft/config.json"]:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("{}")
    # A targeted run of the classic variant: its lock and the root's (the stages it depended on).
    (ws / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate@iter_2": {"outs": [
        {"path": "data/eval/iter_2.parquet"}, {"path": "metrics/eval/iter_2.json"}]}}}))
    (ws / "classic" / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"sft": {"outs": [
        {"path": "classic/models/sft"}, {"path": "classic/metrics/sft.json"}]}}}))
    assert recorded_files(ws) == ["params.yaml", "dvc.lock", "metrics/eval/iter_2.json", "classic/dvc.lock",
                                  "classic/metrics/sft.json"]
