"""Adding an objective or a scorer from a file outside the package (docs/extending.md): tests/plugins/
hinge_objective.py and words_scorer.py, listed in params.yaml's ``plugins``, are read, checked,
trained on (scored with) and tracked as built-in ones are, and nothing in the package names them."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import REPO
from test_training import reference, run_training, synthetic_pairs

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import TrainParams, check_plugins, parse_params
from rlhf_pipeline.registry import OBJECTIVES, SCORERS

PLUGIN = "tests/plugins/hinge_objective.py"
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def with_plugin(objective: dict) -> dict:
    raw = copy.deepcopy(COMMITTED)
    raw["plugins"] = [str(REPO / PLUGIN)]
    raw["train"]["objective"] = objective
    return raw


@pytest.fixture
def hinge():
    yield with_plugin({"name": "hinge", "beta": 0.5})
    OBJECTIVES.unregister("hinge")


def test_an_objective_outside_the_package_is_chosen_by_name_and_its_keys_checked(hinge):
    assert "hinge" not in OBJECTIVES.builtin_names()
    params = parse_params(hinge)  # imports the plugin file, which registers "hinge"
    assert params.train.objective.name == "hinge" and "hinge" in OBJECTIVES.names()
    check_plugins(params)
    assert OBJECTIVES.module_file("hinge") == REPO / PLUGIN
    with pytest.raises(PipelineError, match=r"params.yaml: train.objective.beta: Input should be greater than 0"):
        check_plugins(parse_params(with_plugin({"name": "hinge", "beta": -1})))
    with pytest.raises(PipelineError, match="unknown key train.objective.eta"):
        check_plugins(parse_params(with_plugin({"name": "hinge", "eta": 1.0})))


def test_without_the_plugin_file_the_name_is_unknown():
    OBJECTIVES.unregister("hinge")
    raw = copy.deepcopy(COMMITTED)
    raw["train"]["objective"] = {"name": "hinge"}
    with pytest.raises(PipelineError, match=r"train.objective.name: no objective named 'hinge' \(there are dpo, "
                                            r"ipo, rebel, simpo; an outside plugin is a file listed in plugins\)"):
        parse_params(raw)
    with pytest.raises(PipelineError, match=r"plugins: 'tests/plugins/missing.py': no such Python file"):
        parse_params({**raw, "plugins": ["tests/plugins/missing.py"]})


def test_the_outside_objective_trains_on_the_one_loop(hinge, tiny_policy, tiny_model_dir, tmp_path):
    from rlhf_pipeline.models import load_policy
    from rlhf_pipeline.objectives import make_objective

    params = parse_params(hinge)
    model, tok = tiny_policy
    pairs = synthetic_pairs()
    ref = reference(model, tok, pairs)
    cfg = TrainParams(objective=params.train.objective, temperature=1.0, learning_rate=1e-3, epochs=6,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.0,
                      save_every=100, dtype="float32")
    assert type(make_objective(cfg.objective)).__name__ == "Hinge"
    rows, summary = run_training(tiny_model_dir, pairs, ref, cfg, tmp_path)
    assert summary["objective"] == "hinge" and summary["updates"] == 12
    # the hinge is 1 − β·gap at the start (the policy is π0: gap 0), and falls as the margin opens
    assert rows[0]["loss"] == pytest.approx(1.0, abs=1e-3) and rows[-1]["loss"] < 0.5
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    after = reference(load_policy(tmp_path / "policy", torch.float32, torch.device("cpu")), tok, pairs)
    gaps = [(c - r) - (c0 - r0) for c, r, c0, r0 in zip(*(t.column(k).to_pylist() for t in (after, ref)
                                                          for k in ("chosen_logprob", "rejected_logprob")))]
    assert all(g > 0.5 for g in gaps), gaps


def test_the_generated_dvc_yaml_lists_an_outside_plugin_file():
    from stages.dag import OBJECTIVE, plugin_deps

    params = with_plugin({"name": "hinge", "beta": 0.5})
    params["plugins"] = [PLUGIN]
    deps = plugin_deps((OBJECTIVE,), params=params)
    # an outside objective chosen: its file and every built-in one (a template would name a missing file)
    assert PLUGIN in deps and "rlhf_pipeline/objectives/dpo.py" in deps and "rlhf_pipeline/losses.py" in deps
    assert not any("${" in d for d in deps)
    params["train"]["objective"] = {"name": "dpo", "beta": 0.1}
    deps = plugin_deps((OBJECTIVE,), params=params)
    assert PLUGIN in deps and "rlhf_pipeline/objectives/${train.objective.name}.py" in deps
    assert "rlhf_pipeline/objectives/dpo.py" not in deps


SCORER_PLUGIN = "tests/plugins/words_scorer.py"


@pytest.fixture
def words_scorer():
    raw = copy.deepcopy(COMMITTED)
    raw["plugins"] = [str(REPO / SCORER_PLUGIN)]
    raw["reward"]["scorers"] = [{"name": "ifeval", "weight": 1.0},
                                {"name": "response-words", "weight": 0.5, "options": {"cap": 4}}]
    yield raw
    SCORERS.unregister("response-words")


def test_a_scorer_outside_the_package_is_checked_and_weighted_into_the_reward(words_scorer):
    """The toy scorer's column and weight enter the reward beside IFEval's; its keys are checked by
    its own Params in the first stage's check (check_plugins with scorers)."""
    from test_rewards import custom_prompts

    from rlhf_pipeline.rewards import score_responses

    params = parse_params(words_scorer)
    check_plugins(params, scorers=True)
    assert "response-words" not in SCORERS.builtin_names() and SCORERS.module_file("response-words") == REPO / SCORER_PLUGIN
    prompts = custom_prompts([("p", "Answer without commas.", ["punctuation:no_comma"], [{}])])
    rows = [("p", 0, "one two"), ("p", 1, "one, two three four five")]
    table, facts = score_responses(rows, prompts, params.reward, progress=False)
    # ifeval: 1 then 0 (a comma); words: 2/4 then min(5, 4)/4 = 1; reward = 1·ifeval + 0.5·words
    assert table.column("reward_response_words").to_pylist() == [0.5, 1.0]
    assert table.column("reward").to_pylist() == [1.0 + 0.25, 0.0 + 0.5]
    assert facts["response-words_cap"] == 4
    bad = copy.deepcopy(words_scorer)
    bad["reward"]["scorers"][1]["options"] = {"cap": 0}
    with pytest.raises(PipelineError, match=r"params.yaml: reward.scorers.1.options.cap: Input should be greater than 0"):
        check_plugins(parse_params(bad), scorers=True)


def test_the_generated_dvc_yaml_lists_an_outside_scorer_file():
    from stages.dag import SCORER, plugin_deps

    params = copy.deepcopy(COMMITTED)
    params["plugins"] = [SCORER_PLUGIN]
    deps = plugin_deps((SCORER,), params=params)
    # a list cannot be templated: every built-in scorer file, and the outside one
    assert {SCORER_PLUGIN, "rlhf_pipeline/rewards/ifeval.py", "rlhf_pipeline/rewards/sequence_classification.py"} <= deps
    assert not any("${" in d for d in deps)
