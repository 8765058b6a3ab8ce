import json

import pyarrow as pa
import pytest

from conftest import build_reward_model
from rlhf_pipeline.data import load_ifeval, split_prompts
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import RewardParams
from rlhf_pipeline.rewards import Scorers, penalize_missing_eos, reward_summary, score_responses
from rlhf_pipeline.rewards.ifeval import check_instructions, instruction_registry


def ifeval_prompts(n=6) -> pa.Table:
    return split_prompts(load_ifeval(), n + 2, 1, 1, seed=0).train


def custom_prompts(rows) -> pa.Table:
    """An IFEval-shaped prompt table with chosen instructions."""
    return pa.table({
        "prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
        "instruction_id_list": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "kwargs": [json.dumps(r[3]) for r in rows],
    })


def seq_cls(path, weight=1.0, batch_size=8):
    return {"name": "sequence-classification", "weight": weight,
            "options": {"model": str(path), "batch_size": batch_size, "dtype": "float32"}}


def test_strict_and_loose_verdicts():
    # Loose drops the first line: "Sure, here:" carries the only comma.
    assert check_instructions("Sure, here:\nno commas here", "p", ["punctuation:no_comma"], [{}]) == ([False], [True])
    assert check_instructions("no commas at all", "p", ["punctuation:no_comma"], [{}]) == ([True], [True])


def test_sentence_counting_uses_bundled_punkt():
    kw = [{"relation": "less than", "num_sentences": 3}]
    assert check_instructions("Dr. Smith came. He sat.", "p", ["length_constraints:number_sentences"], kw) == ([True], [True])
    assert check_instructions("One. Two. Three. Four.", "p", ["length_constraints:number_sentences"], kw) == ([False], [False])


def test_a_crashing_checker_scores_zero_for_that_instruction(monkeypatch):
    cls = instruction_registry()["punctuation:no_comma"]

    def boom(self, value):
        raise ValueError("cannot parse")

    monkeypatch.setattr(cls, "check_following", boom)
    strict, loose = check_instructions("all lowercase text", "p",
                                       ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    assert strict == [False, True] and loose == [False, True]


def test_ifeval_reward_is_the_loose_fraction():
    prompts = custom_prompts([("a", "Answer without commas, in lowercase.",
                               ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])])
    rows = [("a", 0, "this answer has no commas and is all lowercase english text"),
            ("a", 1, "This answer, however, breaks both rules."),
            ("a", 2, "This answer has no commas but capitals")]
    table, _ = score_responses(rows, prompts, RewardParams())
    assert table.column("reward").to_pylist() == [1.0, 0.0, 0.5]
    assert table.column("reward_ifeval").to_pylist() == [1.0, 0.0, 0.5]
    assert table.column("ifeval_all_loose").to_pylist() == [True, False, False]
    assert table.column("ifeval_followed_strict").to_pylist()[2] == [True, False]
    summary = reward_summary(table, Scorers(RewardParams()))
    assert summary["ifeval_prompt_accuracy_loose"] == pytest.approx(1 / 3)
    assert summary["ifeval_instruction_accuracy_loose"] == pytest.approx(3 / 6)
    assert summary["all_tied_prompt_share"] == 0.0


def test_missing_eos_penalty_lowers_only_truncated_rewards():
    prompts = custom_prompts([("a", "Answer without commas.", ["punctuation:no_comma"], [{}])])
    rows = [("a", 0, "no commas here"), ("a", 1, "no commas but cut"), ("a", 2, "cut, with a comma")]
    table, _ = score_responses(rows, prompts, RewardParams())
    assert penalize_missing_eos(table, ["stop", "length", "length"], None) is table
    shaped = penalize_missing_eos(table, ["stop", "length", "length"], 0.5)
    assert shaped.column("reward").to_pylist() == [1.0, 0.5, -0.5]
    assert shaped.column("reward_ifeval").to_pylist() == [1.0, 1.0, 0.0]  # the scorer's value is kept
    assert shaped.column("missing_eos").to_pylist() == [False, True, True]
    assert reward_summary(shaped)["missing_eos_share"] == pytest.approx(2 / 3)
    with pytest.raises(PipelineError, match="finish reasons for 3 rows"):
        penalize_missing_eos(table, ["stop"], 0.5)
    with pytest.raises(PipelineError, match="unknown finish_reason"):
        penalize_missing_eos(table, ["stop", "eos", "stop"], 0.5)
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        RewardParams(missing_eos_penalty=-1.0)


def test_ifeval_scorer_needs_ifeval_columns():
    prompts = pa.table({"prompt_id": ["a"], "prompt": ["hi"]})
    with pytest.raises(PipelineError, match=r"the 'ifeval' scorer needs the prompt columns \['instruction_id_list', 'kwargs'\]"):
        score_responses([("a", 0, "hello")], prompts, RewardParams())


def test_unknown_instruction_id_fails_before_scoring():
    prompts = custom_prompts([("a", "x", ["made:up"], [{}])])
    with pytest.raises(PipelineError, match=r"prompt a: unknown IFEval instruction ids \['made:up'\]"):
        score_responses([("a", 0, "hello")], prompts, RewardParams())


def test_real_ifeval_prompts_score_every_response():
    prompts = ifeval_prompts()
    rows = [(pid, k, text) for pid in prompts.column("prompt_id").to_pylist()
            for k, text in enumerate(["", "A short answer.", "*" * 5 + "\nok"])]
    table, _ = score_responses(rows, prompts, RewardParams())
    assert table.num_rows == len(rows)
    assert all(0.0 <= r <= 1.0 for r in table.column("reward").to_pylist())
    assert table.column("reward").to_pylist()[0] == 0.0  # an empty response follows nothing


def test_sequence_classification_scores_are_finite_and_batch_independent(tiny_reward_model_dir):
    rm = tiny_reward_model_dir
    prompts = pa.table({"prompt_id": ["a", "b"], "prompt": ["Say hi.", "Write a long poem about the sea."]})
    rows = [("a", 0, "Hi!"), ("a", 1, "Hello there, friend."), ("b", 0, "Waves " * 20), ("b", 1, "")]
    one, _ = score_responses(rows, prompts, RewardParams(scorers=[seq_cls(rm, batch_size=1)]))
    many, _ = score_responses(rows, prompts, RewardParams(scorers=[seq_cls(rm, batch_size=4)]))
    a, b = one.column("reward").to_pylist(), many.column("reward").to_pylist()
    assert len(set(a)) == 4
    assert a == pytest.approx(b, abs=1e-5)
    assert one.column("reward_sequence_classification").to_pylist() == a


def test_weighted_sum_of_scorers(tiny_reward_model_dir):
    rm = tiny_reward_model_dir
    prompts = custom_prompts([("a", "No commas.", ["punctuation:no_comma"], [{}])])
    rows = [("a", 0, "no commas"), ("a", 1, "a, b")]
    cfg = RewardParams(scorers=[{"name": "ifeval", "weight": 2.0}, seq_cls(rm, weight=0.5)])
    table, facts = score_responses(rows, prompts, cfg)
    for r, i, s in zip(*(table.column(c).to_pylist() for c in ("reward", "reward_ifeval", "reward_sequence_classification"))):
        assert r == pytest.approx(2.0 * i + 0.5 * s)
    assert facts["sequence-classification_truncated"] == 0


def test_nan_reward_names_prompt_and_response(tmp_path, tiny_model_dir):
    rm = build_reward_model(tmp_path / "rm_nan", tiny_model_dir, nan=True)
    prompts = pa.table({"prompt_id": ["a"], "prompt": ["Say hi."]})
    with pytest.raises(PipelineError, match="'sequence-classification' gave reward nan to prompt a response 0"):
        score_responses([("a", 0, "Hi")], prompts, RewardParams(scorers=[seq_cls(rm)]))


def test_reward_model_without_chat_template(tmp_path, tiny_model_dir):
    rm = build_reward_model(tmp_path / "rm", tiny_model_dir)
    (rm / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((rm / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (rm / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = pa.table({"prompt_id": ["a"], "prompt": ["Say hi."]})
    with pytest.raises(PipelineError, match="has no chat template"):
        score_responses([("a", 0, "Hi")], prompts, RewardParams(scorers=[seq_cls(rm)]))


def test_responses_for_unknown_prompts():
    with pytest.raises(PipelineError, match="responses for prompts not in the prompt file"):
        score_responses([("zz", 0, "x")], ifeval_prompts(2), RewardParams())


def test_every_scorer_file_registers_the_scorer_it_is_named_for():
    """A built-in scorer's name is its file's ('-' written '_'); getting it imports that file only."""
    from rlhf_pipeline.registry import SCORERS, plugin_name

    assert SCORERS.builtin_names() == ["ifeval", "sequence-classification"]
    for name in SCORERS.builtin_names():
        cls = SCORERS.get(name, "reward.scorers.0.name")
        assert plugin_name(cls.Params) == name
        assert SCORERS.module_file(name).name == name.replace("-", "_") + ".py"
        assert cls.__module__ == f"rlhf_pipeline.rewards.{name.replace('-', '_')}"


def test_a_bad_scorer_key_is_named_before_scoring():
    with pytest.raises(PipelineError, match=r"reward\.scorers\.0\.weight"):
        Scorers(RewardParams(scorers=[{"name": "ifeval", "weight": "high"}]))
    with pytest.raises(PipelineError, match=r"reward\.scorers\.1\.options\.model"):
        Scorers(RewardParams(scorers=[{"name": "ifeval"}, {"name": "sequence-classification", "options": {}}]))
    with pytest.raises(Exception, match="no scorer named 'bleu'"):
        RewardParams(scorers=[{"name": "bleu"}])


def test_a_reward_model_is_loaded_once_per_stage(tiny_reward_model_dir, monkeypatch):
    """One Scorers object scores several batches (evaluate_base: two splits) with one load."""
    from rlhf_pipeline.rewards import sequence_classification

    loads = []
    real = sequence_classification.load_reward_model
    monkeypatch.setattr(sequence_classification, "load_reward_model", lambda *a: loads.append(1) or real(*a))
    prompts = ifeval_prompts(2)
    pid = prompts.column("prompt_id").to_pylist()[0]
    scorers = Scorers(RewardParams(scorers=[seq_cls(tiny_reward_model_dir)]))
    first, _ = score_responses([(pid, 0, "Hi")], prompts, scorers, progress=False)
    second, _ = score_responses([(pid, 0, "Hi")], prompts, scorers, progress=False)
    assert len(loads) == 1 and first.column("reward").equals(second.column("reward"))
