from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.policy.model == "smollm2-135m-instruct"
    assert params.generate.num_responses >= 2


def test_empty_file_gives_defaults():
    params = parse_params(None)
    assert params.seed == 42 and params.data.source == "ifeval"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"generate": {"temperature": 0}}, "generate.temperature"),
        ({"generate": {"temperature": -1.0}}, "generate.temperature"),
        ({"generate": {"top_p": 0}}, "generate.top_p"),
        ({"generate": {"top_p": 1.01}}, "generate.top_p"),
        ({"generate": {"num_responses": 1}}, "generate.num_responses"),
        ({"generate": {"max_new_tokens": 0}}, "generate.max_new_tokens"),
        ({"generate": {"batch_size": 0}}, "generate.batch_size"),
        ({"generate": {"dtype": "float8"}}, "generate.dtype"),
        ({"generate": {"backend": "tgi"}}, "generate.backend"),
        ({"generate": {"tensor_parallel_size": 0}}, "generate.tensor_parallel_size"),
        ({"generate": {"max_new_tokens": "many"}}, "generate.max_new_tokens"),
        ({"data": {"num_prompts": 10, "test_size": 10}}, "data.test_size"),
        ({"data": {"num_prompts": 10, "test_size": 12}}, "data.test_size"),
        ({"data": {"test_size": 0}}, "data.test_size"),
        ({"data": {"num_prompts": 1}}, "data.num_prompts"),
        ({"data": {"source": "web"}}, "data.source"),
        ({"data": {"source": "file"}}, "data.path"),
        ({"data": {"source": "file", "path": "data/sources/p.csv"}}, "data.path"),
        ({"data": {"source": "file", "path": "/tmp/p.jsonl"}}, "data.path"),
        ({"data": {"source": "file", "path": "data/sources/../../p.jsonl"}}, "data.path"),
        ({"data": {"source": "huggingface"}}, "data.dataset"),
        ({"policy": {"model": ""}}, "policy.model"),
        ({"seed": -1}, "seed"),
        ({"reward": {"scorers": []}}, "reward.scorers"),
        ({"reward": {"scorers": [{"name": "ifeval"}, {"name": "ifeval"}]}}, "reward.scorers"),
        ({"reward": {"scorers": [{"name": "bleu"}]}}, "reward.scorers.0"),
        ({"reward": {"scorers": [{"name": "sequence-classification"}]}},
         "reward.scorers.0.sequence-classification.options"),
        ({"reward": {"scorers": [{"name": "sequence-classification", "options": {"model": "m", "batch_size": 0}}]}},
         "reward.scorers.0.sequence-classification.options.batch_size"),
        ({"reward": {"scorers": [{"name": "ifeval", "weight": float("inf")}]}}, "reward.scorers.0.ifeval.weight"),
        ({"pairs": {"max_prompt_tokens": 0}}, "pairs.max_prompt_tokens"),
        ({"pairs": {"max_response_tokens": -5}}, "pairs.max_response_tokens"),
        ({"pairs": {"min_reward_gap": -0.1}}, "pairs.min_reward_gap"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_rejected_values_name_their_key(raw, key):
    with pytest.raises(PipelineError) as exc:
        parse_params(raw)
    assert f"params.yaml: {key}:" in str(exc.value)


@pytest.mark.parametrize("raw, key", [({"generate": {"temprature": 0.7}}, "generate.temprature"),
                                      ({"trainer": {}}, "trainer"),
                                      ({"reward": {"scorers": [{"name": "ifeval", "options": {"x": 1}}]}},
                                       "reward.scorers.0.ifeval.options.x"),
                                      ({"data": {"split": "train", "shuffle": True}}, "data.shuffle")])
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(PipelineError, match=f"unknown key {key}$"):
        parse_params(raw)


def test_all_errors_in_one_message():
    with pytest.raises(PipelineError) as exc:
        parse_params({"generate": {"temperature": 0, "top_p": 2}})
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and any("generate.temperature" in l for l in lines) and any("generate.top_p" in l for l in lines)


def test_file_source_inside_sources_dir_is_accepted():
    params = parse_params({"data": {"source": "file", "path": "data/sources/p.jsonl", "prompt_field": "q"}})
    assert params.data.path == "data/sources/p.jsonl"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("generate: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PipelineError, match="expected a mapping"):
        load_params(bad)
