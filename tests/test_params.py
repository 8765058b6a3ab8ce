from pathlib import Path

import re

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())


def full(raw: dict) -> dict:
    """The committed params.yaml with ``raw``'s sections merged in (key by key)."""
    import copy

    out = copy.deepcopy(COMMITTED)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.policy.model == "smollm2-135m-instruct"
    assert params.generate.num_responses >= 2


def test_schema_defaults_are_the_committed_params():
    """One source of defaults: a section given as {} gets exactly the committed values."""
    given = {"seed": COMMITTED["seed"], "iterations": COMMITTED["iterations"]}  # no defaults: they are the run
    sections = [k for k in Params.model_fields if k not in given and k != "plugins"]  # plugins: a list, default []
    empty_sections = Params.model_validate({**given, **{k: {} for k in sections}})
    assert empty_sections.model_dump() == load_params(REPO / "params.yaml").model_dump()


@pytest.mark.parametrize("iterations, message", [
    ({}, "iterations: at least one iteration is needed"),
    ({"iter_1": {"prev": "base"}, "iter_3": {"prev": "iter_2"}}, "iterations are named iter_1, iter_2, ... in order; "
                                                                 "item 2 is 'iter_3'"),
    ({"iter_1": {"prev": "base"}, "iter_2": {"prev": "base"}}, "iterations.iter_2.prev: 'base', but iteration 2 "
                                                               "starts from 'iter_1'"),
    ({"iter_1": {"prev": "base", "eta": 1}}, "unknown key iterations.iter_1.eta"),
])
def test_iterations_must_chain(iterations, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        parse_params({**COMMITTED, "iterations": iterations})


def test_objective_params_are_the_active_objectives_only():
    from rlhf_pipeline.params import check_plugins

    train = {**COMMITTED["train"], "objective": {"name": "dpo", "beta": 0.2}}
    assert parse_params({**COMMITTED, "train": train}).train.objective.beta == 0.2
    # reading params.yaml checks the name only; the plugin's Params checks its keys (check_plugins)
    loose = parse_params({**COMMITTED, "train": {**train, "objective": {"name": "dpo", "eta": 1.0}}})
    with pytest.raises(PipelineError, match="unknown key train.objective.eta"):
        check_plugins(loose)
    with pytest.raises(PipelineError, match="train.objective.name: no objective named 'ppo'"):
        parse_params({**COMMITTED, "train": {**train, "objective": {"name": "ppo"}}})


def test_empty_file_and_missing_section_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="the file is empty; every section"):
        parse_params(None)
    raw = full({})
    del raw["train"]
    with pytest.raises(PipelineError, match=r"^params.yaml: train: missing"):
        parse_params(raw)
    empty = tmp_path / "params.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(PipelineError, match="the file is empty"):
        load_params(empty)


def test_duplicate_keys_are_an_error(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("    beta: 0.1", "    beta: 0.1\n    beta: 0.2")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match="not valid YAML.*duplicate key 'beta'"):
        load_params(path)


@pytest.mark.parametrize("raw, key", [({"generate": {"max_new_tokens": True}}, "generate.max_new_tokens"),
                                      ({"seed": True}, "seed"),
                                      ({"train": {"learning_rate": True}}, "train.learning_rate"),
                                      ({"generate": {"batch_size": 8.5}}, "generate.batch_size"),
                                      ({"train": {"gradient_checkpointing": 1}}, "train.gradient_checkpointing")])
def test_booleans_are_not_numbers(raw, key):
    with pytest.raises(PipelineError, match=f"params.yaml: {key}:"):
        parse_params(full(raw))


def test_a_yaml_bomb_in_a_value_gives_a_short_error(tmp_path):
    """Aliases nest a 9-element list 8 levels deep (9**8 leaves): repr-ing the rejected value would
    expand hundreds of megabytes; the message shows a bounded start."""
    import time

    lines = ["bomb0: &b0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"bomb{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\n" + (REPO / "params.yaml").read_text().replace("  test_size: 24", "  test_size: *b8")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(PipelineError) as exc:
        load_params(path)
    assert time.perf_counter() - t0 < 30  # unbounded, this took minutes and hundreds of MB
    message = str(exc.value)
    assert "data.test_size" in message and len(message) < 2000


def test_log_prob_temperature_follows_sampling_unless_allowed():
    params = parse_params(full({}))
    assert params.train.temperature is None and params.logprob_temperature() == params.generate.temperature
    with pytest.raises(PipelineError, match=r"params.yaml: train.temperature: 1.0 differs from generate.temperature "
                                            r"0.8: the log-probs of training would be those of another distribution"):
        parse_params(full({"train": {"temperature": 1.0}}))
    allowed = parse_params(full({"train": {"temperature": 1.0, "allow_temperature_mismatch": True}}))
    assert allowed.logprob_temperature() == 1.0
    assert parse_params(full({"train": {"temperature": 0.8}})).logprob_temperature() == 0.8


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
        ({"reward": {"scorers": [{"name": "bleu"}]}}, "reward.scorers.0.name"),
        ({"reward": {"scorers": [{"name": "sequence-classification"}]}},
         "reward.scorers.0.options"),
        ({"reward": {"scorers": [{"name": "sequence-classification", "options": {"model": "m", "batch_size": 0}}]}},
         "reward.scorers.0.options.batch_size"),
        ({"reward": {"scorers": [{"name": "ifeval", "weight": float("inf")}]}}, "reward.scorers.0.weight"),
        ({"pairs": {"max_prompt_tokens": 0}}, "pairs.max_prompt_tokens"),
        ({"pairs": {"max_response_tokens": -5}}, "pairs.max_response_tokens"),
        ({"pairs": {"min_reward_gap": -0.1}}, "pairs.min_reward_gap"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_rejected_values_name_their_key(raw, key):
    from rlhf_pipeline.params import check_plugins

    with pytest.raises(PipelineError) as exc:  # a scorer's keys are its plugin's Params' (check_plugins)
        check_plugins(parse_params(full(raw)), scorers=True)
    assert f"params.yaml: {key}:" in str(exc.value)


@pytest.mark.parametrize("raw, key", [({"generate": {"temprature": 0.7}}, "generate.temprature"),
                                      ({"trainer": {}}, "trainer"),
                                      ({"reward": {"scorers": [{"name": "ifeval", "options": {"x": 1}}]}},
                                       "reward.scorers.0.options.x"),
                                      ({"data": {"split": "train", "shuffle": True}}, "data.shuffle")])
def test_unknown_keys_are_named(raw, key):
    from rlhf_pipeline.params import check_plugins

    with pytest.raises(PipelineError, match=f"unknown key {key}$"):
        check_plugins(parse_params(full(raw)), scorers=True)


def test_all_errors_in_one_message():
    with pytest.raises(PipelineError) as exc:
        parse_params(full({"generate": {"temperature": 0, "top_p": 2}}))
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and any("generate.temperature" in l for l in lines) and any("generate.top_p" in l for l in lines)


def test_file_source_inside_sources_dir_is_accepted():
    params = parse_params(full({"data": {"source": "file", "path": "data/sources/p.jsonl", "prompt_field": "q"}}))
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


@pytest.mark.parametrize("raw, key", [({"train": {"learning_rate": float("inf")}}, "train.learning_rate"),
                                      ({"generate": {"temperature": float("inf")}}, "generate.temperature"),
                                      ({"reward": {"missing_eos_penalty": float("inf")}}, "reward.missing_eos_penalty"),
                                      ({"online": {"learning_rate": float("-inf")}}, "online.learning_rate"),
                                      ({"train": {"max_grad_norm": float("nan")}}, "train.max_grad_norm")])
def test_infinite_and_nan_numbers_are_refused(raw, key):
    # .inf validated, trained one update and saved a model of 134,515,008 non-finite weights, exit 0
    with pytest.raises(PipelineError, match=f"params.yaml: {re.escape(key)}:"):
        parse_params(full(raw))


@pytest.mark.parametrize("old, new, key", [("seed: 42", "seed: 052", "seed"),
                                           ("  reuse_prompts: false", "  reuse_prompts: off", "data.reuse_prompts"),
                                           ("  gradient_checkpointing: false", "  gradient_checkpointing: no",
                                            "train.gradient_checkpointing")])
def test_values_yaml_1_1_and_dvc_read_differently_are_refused(tmp_path, old, new, key):
    # `seed: 052` ran with seed 42 (octal, YAML 1.1) while `dvc params diff` recorded 52 (YAML 1.2)
    text = (REPO / "params.yaml").read_text()
    assert old in text
    (tmp_path / "params.yaml").write_text(text.replace(old, new, 1))
    with pytest.raises(PipelineError, match=f"{re.escape(key)}: ambiguous YAML: the stages read .* but DVC reads"):
        load_params(tmp_path / "params.yaml")
    # 1e-4 is a string to YAML 1.1 and a float to YAML 1.2; the schema reads the same float: accepted
    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 6.0e-5", "learning_rate: 6e-5", 1))
    assert load_params(tmp_path / "params.yaml").train.learning_rate == 6e-5


@pytest.mark.parametrize("key", ["x; touch /tmp/INJECTED #", "../../data/evil", "a b", "", "-x", "é"])
def test_online_algorithm_keys_are_plain_names(key):
    # a key becomes a stage name, a folder and a word of a shell command in online/dvc.yaml
    with pytest.raises(PipelineError, match="online.algorithms: the key .* is not a plain name"):
        parse_params(full({"online": {"algorithms": {key: {"name": "grpo"}}}}))
    assert parse_params(full({"online": {"algorithms": {"grpo-2_b": {"name": "grpo"}}}}))


@pytest.mark.parametrize("dtype", ["bfloat16", "auto", "float16"])
def test_online_rl_refuses_other_dtypes_than_float32(dtype):
    with pytest.raises(PipelineError, match="online.dtype: online RL runs in float32 only"):
        parse_params(full({"online": {"dtype": dtype}}))


def test_error_paths_name_the_key_once():
    from rlhf_pipeline.params import check_plugins

    params = parse_params(full({"online": {"algorithms": {"grpo": {"name": "grpo", "clip": -1}}},
                                "train": {"objective": {"name": "rebel", "eta": -1}}}))
    with pytest.raises(PipelineError) as exc:
        check_plugins(params, online=("grpo",))
    assert "online.algorithms.grpo.clip:" in str(exc.value) and "train.objective.eta:" in str(exc.value)
    assert "grpo.grpo" not in str(exc.value) and "rebel.eta" not in str(exc.value)


@pytest.mark.parametrize("section", ["evaluate", "reward_model"])
def test_bootstrap_resamples_are_bounded(section):
    # 1e8 resamples ran the whole evaluation, then failed with a MemoryError
    with pytest.raises(PipelineError, match=f"{section}.bootstrap_samples"):
        parse_params(full({section: {"bootstrap_samples": 100_000_000}}))


def test_iterations_that_need_more_train_prompts_than_num_prompts_leaves_are_refused():
    iterations = {f"iter_{t}": {"prev": "base" if t == 1 else f"iter_{t - 1}"} for t in range(1, 51)}
    with pytest.raises(PipelineError, match="iterations: 50 iterations of data.prompts_per_iteration=16 disjoint "
                                            "prompts need 800 train prompts, but data.num_prompts leaves 160"):
        parse_params(full({"iterations": iterations, "data": {"num_prompts": 200}}))
    assert parse_params(full({"iterations": iterations, "data": {"num_prompts": 200, "reuse_prompts": True}}))
