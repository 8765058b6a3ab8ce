"""A learned reward model as the training reward (the classic variant's RL step): the params it
builds, its agreement with the ground-truth scorer by hand, and the score stage with --reward-model."""

import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, stage_env
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import RewardParams
from rlhf_pipeline.learned_reward import learned_reward_params, reward_agreement
from rlhf_pipeline.rewards import Scorers, score_responses


def test_agreement_by_hand():
    # prompt a: gold orders (3 vs 1) and (3 vs 2), the proxy agrees on both; (1 vs 2) ties on gold
    # and is not counted. prompt b: gold orders the pair, the proxy ties: one half. 2.5 / 3.
    table = pa.table({"prompt_id": ["a", "a", "a", "b", "b"], "proxy": [3.0, 1.0, 2.0, 0.0, 0.0],
                      "gold": [1.0, 0.0, 0.0, 1.0, 0.0]})
    out = reward_agreement(table, "proxy", "gold")
    assert (out["pairs"], out["prompts"]) == (3, 2)
    assert out["pairwise_accuracy"] == pytest.approx(2.5 / 3)
    # Pearson: deviations (1.8, -0.2, 0.8, -1.2, -1.2) and (0.6, -0.4, -0.4, 0.6, -0.4): 0.6 / sqrt(6.8 x 1.2)
    assert out["pearson"] == pytest.approx(0.6 / math.sqrt(6.8 * 1.2))


def test_a_proxy_ordering_against_gold_scores_zero_and_a_constant_gold_orders_nothing():
    reversed_ = pa.table({"prompt_id": ["a", "a"], "proxy": [0.0, 1.0], "gold": [1.0, 0.0]})
    assert reward_agreement(reversed_, "proxy", "gold")["pairwise_accuracy"] == 0.0
    constant = pa.table({"prompt_id": ["a", "a", "b"], "proxy": [0.0, 1.0, 2.0], "gold": [0.5, 0.5, 0.5]})
    out = reward_agreement(constant, "proxy", "gold")
    assert (out["pairs"], out["prompts"]) == (0, 0)
    assert math.isnan(out["pairwise_accuracy"]) and math.isnan(out["pearson"])
    with pytest.raises(PipelineError, match=r"no column \['gold'\]"):
        reward_agreement(constant.drop_columns(["gold"]), "proxy", "gold")


def test_learned_reward_is_the_only_weighted_scorer():
    cfg = RewardParams(scorers=[{"name": "ifeval", "weight": 2.0},
                                {"name": "sequence-classification", "weight": 0.5,
                                 "options": {"model": "RLHFlow/ArmoRM-Llama3-8B-v0.1", "score_attribute": "score"}}],
                       missing_eos_penalty=0.5)
    out = learned_reward_params(cfg, "classic/models/reward")
    built = [c for c, _ in Scorers(out).scorers]  # each scorer's validated Params (no model is loaded)
    assert [(s.name, s.weight) for s in built] == [("sequence-classification", 1.0), ("ifeval", 0.0)]
    assert built[0].options.model == "classic/models/reward"
    assert built[0].options.score_attribute is None  # the configured model's options are not carried over
    assert out.missing_eos_penalty == 0.5
    only_rm = RewardParams(scorers=[{"name": "sequence-classification", "options": {"model": "x"}}])
    with pytest.raises(PipelineError, match="needs a ground-truth scorer"):
        learned_reward_params(only_rm, "classic/models/reward")


def score_project(root, rows):
    """IFEval prompts (no commas) with generations for ``python -m stages.score``."""
    (root / "data/prompts").mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Say hi, no commas.", "List two fruits, no commas."],
                             "instruction_id_list": pa.array([["punctuation:no_comma"]] * 2, pa.list_(pa.string())),
                             "kwargs": [json.dumps([{}])] * 2}), root / "data/prompts/train.parquet")
    pq.write_table(pa.table({"prompt_id": pa.array([r[0] for r in rows], pa.string()),
                             "response_idx": pa.array([r[1] for r in rows], pa.int32()),
                             "response": pa.array([r[2] for r in rows], pa.string()),
                             "finish_reason": pa.array([r[3] for r in rows], pa.string())}),
                   root / "data/generations.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "stages").symlink_to(REPO / "stages")
    return root


def run_score(root, reward_model):
    cmd = [sys.executable, "-m", "stages.score", "--reward-model", str(reward_model),
           "--generations", "data/generations.parquet", "--prompts", "data/prompts/train.parquet",
           "--out", "data/scores.parquet", "--metrics", "metrics/score.json"]
    return subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=True, text=True)


def test_score_stage_trains_on_the_reward_model_and_reports_its_agreement_with_ifeval(tmp_path, tiny_reward_model_dir):
    # three lines, the comma in the middle one: IFEval's loose variants (first or last line dropped) keep it
    rows = [("a", 0, "Hi\nthere you\nbye", "stop"), ("a", 1, "Hi\nthere, you\nbye", "stop"),
            ("a", 2, "Hello\nyou, friend\nand", "length"), ("b", 0, "Fruits\napple pear\nend", "stop"),
            ("b", 1, "Fruits\napple, pear\nend", "stop")]
    root = score_project(tmp_path, rows)
    proc = run_score(root, tiny_reward_model_dir)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(root / "data/scores.parquet")
    prompts = pq.read_table(root / "data/prompts/train.parquet")
    direct, _ = score_responses([r[:3] for r in rows], prompts, RewardParams(
        scorers=[{"name": "sequence-classification", "options": {"model": str(tiny_reward_model_dir)}}]))
    rm = table.column("reward_sequence_classification").to_pylist()
    assert rm == pytest.approx(direct.column("reward").to_pylist(), abs=1e-6)
    # the reward is the reward model's score alone, less the missing-EOS penalty (1.0) on the cut response
    assert table.column("reward").to_pylist() == pytest.approx([s - (r[3] == "length") for s, r in zip(rm, rows)])
    assert table.column("reward_ifeval").to_pylist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    metrics = json.loads((root / "metrics/score.json").read_text())
    expected = reward_agreement(table, "reward_sequence_classification", "reward_ifeval")
    assert metrics["reward_model"] == str(tiny_reward_model_dir)
    assert (metrics["agreement_ifeval_pairs"], metrics["agreement_ifeval_prompts"]) == (3, 2) == (
        expected["pairs"], expected["prompts"])
    assert metrics["agreement_ifeval_pairwise_accuracy"] == pytest.approx(expected["pairwise_accuracy"], abs=1e-6)
    assert metrics["ifeval_prompt_accuracy_loose"] == pytest.approx(2 / 5)  # IFEval's own figures still reported


def test_a_missing_reward_model_stops_score_before_any_output(tmp_path):
    root = score_project(tmp_path, [("a", 0, "hi", "stop")])
    proc = run_score(root, tmp_path / "no_such_model")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--reward-model {tmp_path / 'no_such_model'}: not a model folder" in proc.stderr
    assert not (root / "data/scores.parquet").exists() and not (root / "metrics").exists()


def test_proxy_and_gold_gains_by_hand():
    from rlhf_pipeline.learned_reward import proxy_and_gold

    comparison = pa.table({"prompt_id": ["a", "b"], "response_idx": [0, 0], "base_reward_ifeval": [0.0, 1.0],
                           "trained_reward_ifeval": [1.0, 1.0], "kl": [2.0, 4.0]})
    out = proxy_and_gold(comparison, [0.0, 0.0], [1.0, -1.0], "reward_ifeval", 2000, 0.95, seed=0)
    assert (out["responses"], out["kl"]) == (2, 3.0)
    assert (out["proxy_base"], out["proxy_trained"], out["proxy_gain"]) == (0.0, 0.0, 0.0)
    assert (out["gold_base"], out["gold_trained"], out["gold_gain"]) == (0.5, 1.0, 0.5)
    assert out["proxy_gain_ci"][0] < 0.0 < out["proxy_gain_ci"][1]  # gains of +1 and -1
    assert out["gold_gain_ci"][0] <= 0.5 <= out["gold_gain_ci"][1]
    # prompt a: gold prefers the trained response and so does the proxy; prompt b: a gold tie, not counted
    assert (out["agreement_pairs"], out["agreement_pairwise_accuracy"]) == (1, 1.0)
    with pytest.raises(PipelineError, match="1 and 2 proxy rewards for 2 rows"):
        proxy_and_gold(comparison, [0.0], [1.0, -1.0], "reward_ifeval", 10, 0.95, seed=0)
    with pytest.raises(PipelineError, match=r"no column \['kl'\]"):
        proxy_and_gold(comparison.drop_columns(["kl"]), [0.0, 0.0], [1.0, -1.0], "reward_ifeval", 10, 0.95, seed=0)
