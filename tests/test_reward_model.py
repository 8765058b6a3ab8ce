"""Bradley–Terry reward model: preference records and their errors, pairs from scored generations,
the seeded split, held-out metrics by hand, and a tiny reward model that learns a preference and
scores through the sequence-classification scorer exactly as it was trained."""

import json

import pyarrow as pa
import pytest
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.objectives import RewardModelTask
from rlhf_pipeline.params import RewardModelParams
from rlhf_pipeline.preferences import Preference, from_generations, load_source, split_preferences, to_preference

USER = (("user", "Name a fruit."),)


def test_text_and_message_records():
    assert to_preference({"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."}, "r") == Preference(
        USER, "Apple.", "Rock.")
    # UltraFeedback-binarized: chosen and rejected repeat the prompt's turns
    record = {"prompt": "Name a fruit.",
              "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
              "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Rock."}],
              "margin": 2}
    assert to_preference(record, "r") == Preference(USER, "Apple.", "Rock.", 2.0)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are the same text"),
    ({"prompt": "Hi", "chosen": "A"}, r"missing \['rejected'\]"),
    ({"prompt": "Hi", "chosen": "A", "rejected": " "}, "field 'rejected' is empty"),
    ({"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": float("nan")}, "'margin' must be a finite number"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "A"}],
      "rejected": "B"}, "turns of 'chosen' before its response are not the prompt's"),
    ({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "A", "rejected": "B"}, "end with a user turn"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(PipelineError, match=f"prefs.jsonl:3: .*{message}"):
        to_preference(record, "prefs.jsonl:3")


def test_file_source_names_the_bad_row(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    path = sources / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "Hey", "rejected": "Hey"}) + "\n")
    cfg = RewardModelParams(source="file", path=str(path))
    with pytest.raises(PipelineError, match=r"prefs.jsonl:2: chosen and rejected are the same text"):
        load_source(cfg, sources)
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    prefs, _ = load_source(cfg, sources)
    assert prefs == [Preference((("user", "Hi"),), "Hello!", "Go away.")]


def test_pairs_from_generations_by_hand():
    gens = pa.table({"prompt_id": ["p", "p", "p", "p", "q", "q"], "response_idx": [0, 1, 2, 3, 0, 1],
                     "response": ["a", "b", "c", "d", "x", "x"]})
    scores = pa.table({"prompt_id": ["q", "q", "p", "p", "p", "p"], "response_idx": [0, 1, 3, 2, 1, 0],
                       "reward": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]})
    prefs, counts = from_generations({"p": "P?", "q": "Q?"}, gens, scores, 0.0)
    # p: rewards a 1, b 0, c 1, d 0.5; pairs in response order, a-c a tie. q: equal texts.
    assert [(x.chosen, x.rejected) for x in prefs] == [("a", "b"), ("a", "d"), ("c", "b"), ("d", "b"), ("c", "d")]
    assert prefs[0].prompt == (("user", "P?"),)
    assert counts == {"prompts": 2, "pairs_dropped_reward_gap": 1, "pairs_dropped_identical_texts": 1}
    prefs, counts = from_generations({"p": "P?", "q": "Q?"}, gens, scores, 0.5)
    assert [(x.chosen, x.rejected) for x in prefs] == [("a", "b"), ("c", "b")]
    with pytest.raises(PipelineError, match="response 3 of prompt p has no score"):
        from_generations({"p": "P?"}, gens.slice(0, 4), scores.slice(3, 3), 0.0)


def _prefs(n, per_prompt=1):
    fruits = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach", "grape", "melon", "mango", "lemon"]
    return [Preference((("user", f"Name fruit number {i}."),), f"{f} is a fruit{'!' * k}", f"I will not answer {i}.")
            for i, f in enumerate(fruits[:n]) for k in range(per_prompt)]


def test_split_is_by_prompt_seeded_and_independent_of_row_order(tiny_policy):
    _, tok = tiny_policy
    cfg = RewardModelParams(val_size=3, max_tokens=200)
    split = split_preferences(tok, _prefs(10, per_prompt=2) + _prefs(2), cfg, 3)
    assert split.counts == {"source_pairs": 22, "dropped_too_long": 0, "dropped_control_tokens": 0, "duplicates_dropped": 2, "train_prompts": 7,
                            "val_prompts": 3, "train_pairs": 14, "val_pairs": 6}
    # a prompt's pairs share its responses: they are all on one side of the split
    val_rejected = {tuple(r) for r in split.val[1]}
    assert not val_rejected & {tuple(r) for r in split.train[1]}
    again = split_preferences(tok, list(reversed(_prefs(10, per_prompt=2))), cfg, 3)
    assert (again.train, again.val) == (split.train, split.val) and again.digest() == split.digest()
    assert split.val != split_preferences(tok, _prefs(10), cfg, 4).val
    from rlhf_pipeline.rewards.sequence_classification import conversation_ids

    # each side is the conversation exactly as the scorer tokenizes it
    assert conversation_ids(tok, "Name fruit number 0.", "apple is a fruit") in split.train[0] + split.val[0]
    with pytest.raises(PipelineError, match=r"reward_model.num_prompts: 11 requested but prompts with a distinct "
                                            r"pair within reward_model.max_tokens=1024 \(0 pairs longer\): 10"):
        split_preferences(tok, _prefs(10), RewardModelParams(num_prompts=11, val_size=3), 3)
    with pytest.raises(PipelineError, match=r"reward_model.val_size: 10 leaves nothing to train on out of 10"):
        split_preferences(tok, _prefs(10), RewardModelParams(val_size=10), 3)


def test_heldout_metrics_by_hand(monkeypatch):
    task = RewardModelTask([[1]] * 4, [[2]] * 4, [0.0] * 4, 0, None, "pairs")
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0, 0.5]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    monkeypatch.setattr(task, "rewards", lambda model, idx: (chosen[idx], rejected[idx]))
    m = task.heldout_metrics(None, 2, 1000, 2, 0)
    # gaps 1, 0 (a tie: half), 3, −0.5 -> accuracy (1 + 0.5 + 1 + 0) / 4
    assert m["accuracy"] == 0.625 and m["pairs"] == 4 and m["mean_reward_gap"] == pytest.approx(0.875)
    assert m["accuracy_ci"][0] <= 0.625 <= m["accuracy_ci"][1] and not m["above_chance"]
    # |gap| sorted: 0 (tie), 0.5 (wrong) | 1, 3 (right): the confident half is right
    assert [(b["pairs"], b["accuracy"]) for b in m["calibration"]] == [(2, 0.25), (2, 1.0)]
    assert m["calibration"][0]["abs_gap_max"] == 0.5 and m["calibration"][1]["abs_gap_min"] == 1.0


def test_reward_model_task_rejects_empty_input():
    with pytest.raises(PipelineError, match="no preference pairs"):
        RewardModelTask([], [], [], 0, None, "pairs")
    with pytest.raises(PipelineError, match="pairs: row 1 has an empty rejected"):
        RewardModelTask([[1], [1]], [[2], []], [0.0, 0.0], 0, None, "pairs")


def test_a_tiny_reward_model_learns_the_preference_and_scores_as_trained(tiny_policy, tiny_model_dir, tmp_path):
    from rlhf_pipeline.rewards.sequence_classification import SequenceClassificationOptions
    from rlhf_pipeline.rewards.sequence_classification import load_reward_model, score
    from rlhf_pipeline.training import train_policy

    _, tok = tiny_policy
    split = split_preferences(tok, _prefs(12), RewardModelParams(val_size=2, max_tokens=200), 0)
    task = RewardModelTask(*split.train, tok.pad_token_id, 0.01, "pairs")
    cfg = RewardModelParams(learning_rate=1e-2, epochs=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            warmup_ratio=0.0, save_every=100, dtype="float32")
    rows, summary = train_policy(tiny_model_dir, task, cfg, 0, tmp_path / "rm", tmp_path / "ckpt", "f",
                                 progress=False, evaluate=lambda m: {"after": task.heldout_metrics(m, 4, 200, 2, 0)})
    assert summary["objective"] == "bradley_terry" and summary["updates"] == 15
    assert summary["after"]["accuracy"] == 1.0 and rows[-1]["loss"] < rows[0]["loss"]
    # The folder is a sequence-classification reward model: the scorer gives the rewards training saw.
    model, rm_tok = load_reward_model(SequenceClassificationOptions(model=str(tmp_path / "rm"), dtype="float32"),
                                      torch.device("cpu"))
    prompts = {"p0": {"prompt": "Name fruit number 0."}}
    got = score(prompts, [("p0", "apple is a fruit"), ("p0", "I will not answer 0.")],
                SequenceClassificationOptions(model=str(tmp_path / "rm")), model, rm_tok, torch.device("cpu"),
                progress=False)[0]["reward_sequence_classification"].to_pylist()
    from rlhf_pipeline.rewards.sequence_classification import conversation_ids

    ids = [conversation_ids(rm_tok, "Name fruit number 0.", t) for t in ("apple is a fruit", "I will not answer 0.")]
    check = RewardModelTask([ids[0]], [ids[1]], [0.0], rm_tok.pad_token_id, None, "p")
    with torch.no_grad():
        c, r = check.rewards(model, [0])
    assert got == pytest.approx([c.item(), r.item()], rel=1e-5) and got[0] > got[1]
