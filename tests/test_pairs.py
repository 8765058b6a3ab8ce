import pyarrow as pa
import pytest

from rlhf_pipeline.chat import chat_messages, prompt_token_ids
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import load_tokenizer
from rlhf_pipeline.schemas import PAIRS as PAIRS_SCHEMA
from rlhf_pipeline.pairs import Candidate, build_pairs, join_scores
from rlhf_pipeline.params import PairsParams


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def sampled(tok, text: str, finish: str = "stop") -> list[int]:
    """Ids as the sampler records them for ``text``: the end-of-turn token only if it stopped."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return ids + [tok.eos_token_id] if finish == "stop" else ids


def run(tok, responses, prompts=None, **cfg):
    """``responses``: {prompt_id: [(response_idx, text, reward[, finish_reason])]}."""
    prompts = prompts or {pid: f"Prompt {pid}: answer briefly." for pid in responses}
    cands = {pid: [Candidate(r[0], r[1], r[2], sampled(tok, r[1], *r[3:]), (*r[3:], "stop")[0]) for r in rows]
             for pid, rows in responses.items()}
    return build_pairs(cands, prompts, tok, PairsParams(**cfg))


def test_argmax_argmin_with_lowest_index_tie_break(tok):
    table, counts = run(tok, {"p": [(0, "a", 0.5), (1, "b", 1.0), (2, "c", 1.0), (3, "d", 0.0), (4, "e", 0.0)]})
    row = table.to_pylist()[0]
    assert (row["chosen_response_idx"], row["rejected_response_idx"]) == (1, 3)
    assert (row["chosen"], row["rejected"], row["chosen_reward"], row["rejected_reward"]) == ("b", "d", 1.0, 0.0)
    assert table.schema == PAIRS_SCHEMA
    assert counts["pairs_out"] == 1 and counts["mean_reward_gap"] == 1.0


def test_token_ids_decode_to_the_rendered_conversation(tok):
    prompt, response = "Name a colour.", "Blue, the colour of the sea."
    table, _ = run(tok, {"p": [(0, response, 1.0), (1, "Red", 0.0)]}, prompts={"p": prompt})
    row = table.to_pylist()[0]
    assert row["prompt_ids"] == prompt_token_ids(tok, prompt)
    assert row["chosen_ids"][-1] == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    decoded = tok.decode(row["prompt_ids"] + row["chosen_ids"])
    rendered = tok.apply_chat_template(chat_messages(prompt) + [{"role": "assistant", "content": response}],
                                       tokenize=False)
    # The template adds only a newline after the end-of-turn token.
    assert rendered.startswith(decoded) and rendered[len(decoded):].strip() == ""
    assert tok.decode(row["chosen_ids"][:-1]) == response


def test_prompt_length_filter(tok):
    long = {"long": "word " * 300, "short": "Hi."}
    responses = {"long": [(0, "a", 1.0), (1, "b", 0.0)], "short": [(0, "a", 1.0), (1, "b", 0.0)]}
    limit = len(prompt_token_ids(tok, "Hi."))
    table, counts = run(tok, responses, prompts=long, max_prompt_tokens=limit)
    assert table.column("prompt_id").to_pylist() == ["short"] and counts["dropped_prompt_too_long"] == 1


def test_response_length_counts_the_end_of_turn_token(tok):
    text = "one two three"
    n = len(sampled(tok, text))  # tokens + <|im_end|>
    responses = {"p": [(0, text, 1.0), (1, "x", 0.0), (2, "y", 0.5)]}
    _, counts = run(tok, responses, max_response_tokens=n)
    assert counts["responses_dropped_too_long"] == 0
    table, counts = run(tok, responses, max_response_tokens=n - 1)
    assert counts["responses_dropped_too_long"] == 1
    assert table.to_pylist()[0]["chosen"] == "y"  # the best response left


def test_prompt_with_every_response_too_long(tok):
    responses = {"p": [(0, "many words here", 1.0), (1, "more words here", 0.0)], "q": [(0, "a", 1.0), (1, "b", 0.0)]}
    _, counts = run(tok, responses, max_response_tokens=3)
    assert counts["dropped_response_too_long"] == 1 and counts["pairs_out"] == 1


def test_one_response_per_prompt(tok):
    _, counts = run(tok, {"p": [(0, "only", 1.0)], "q": [(0, "a", 1.0), (1, "b", 0.0)]})
    assert counts["dropped_too_few_responses"] == 1 and counts["pairs_out"] == 1


def test_identical_texts_and_ties(tok):
    responses = {"same": [(0, "x", 0.0), (1, "x", 0.0)], "tie": [(0, "a", 0.5), (1, "b", 0.5)],
                 "ok": [(0, "a", 1.0), (1, "b", 0.0)]}
    _, counts = run(tok, responses)
    assert counts["dropped_identical_texts"] == 1 and counts["dropped_reward_tie"] == 1 and counts["pairs_out"] == 1


def test_min_reward_gap(tok):
    responses = {"small": [(0, "a", 0.6), (1, "b", 0.5)], "big": [(0, "a", 1.0), (1, "b", 0.0)]}
    _, counts = run(tok, responses, min_reward_gap=0.2)
    assert counts["dropped_below_min_reward_gap"] == 1 and counts["pairs_out"] == 1
    _, counts = run(tok, responses)
    assert counts["pairs_out"] == 2


def test_empty_response_is_a_valid_rejected(tok):
    table, _ = run(tok, {"p": [(0, "", 0.0), (1, "A real answer.", 1.0)]})
    assert table.to_pylist()[0]["rejected_ids"] == [tok.eos_token_id]


def test_every_pair_filtered_names_the_filters(tok):
    with pytest.raises(PipelineError) as exc:
        run(tok, {"a": [(0, "x", 0.0), (1, "y", 0.0)], "b": [(0, "z", 1.0)]})
    msg = str(exc.value)
    assert "no pairs left: every one of 2 prompts" in msg
    assert "1 too few responses" in msg and "1 reward tie" in msg


def generations(pids, idxs, texts):
    return pa.table({"prompt_id": pids, "response_idx": pa.array(idxs, pa.int32()), "response": texts,
                     "token_ids": [[5, 2]] * len(pids), "finish_reason": ["stop"] * len(pids)})


def scores_table(pids, idxs, rewards):
    return pa.table({"prompt_id": pids, "response_idx": pa.array(idxs, pa.int32()), "reward": rewards})


def test_join_detects_missing_scores():
    gens = generations(["a", "a"], [0, 1], ["x", "y"])
    with pytest.raises(PipelineError, match=r"unscored responses \[\('a', 1\)\]"):
        join_scores(gens, scores_table(["a"], [0], [1.0]), "g", "s")
    joined = join_scores(gens, scores_table(["a", "a"], [0, 1], [1.0, 0.0]), "g", "s")["a"]
    assert [(c.response_idx, c.text, c.reward, c.ids, c.finish_reason) for c in joined] == [
        (0, "x", 1.0, [5, 2], "stop"), (1, "y", 0.0, [5, 2], "stop")]


def test_duplicate_rows_are_an_error_naming_the_key():
    """Two rows for one (prompt_id, response_idx) used to merge silently (the last one kept)."""
    scores = scores_table(["a", "a"], [0, 1], [1.0, 0.0])
    with pytest.raises(PipelineError, match=r"^gens.parquet: rows 0 and 2 are both prompt_id 'a' response_idx 0"):
        join_scores(generations(["a", "a", "a"], [0, 1, 0], ["x", "y", "z"]), scores, "gens.parquet", "s")
    with pytest.raises(PipelineError, match=r"^scores.parquet: rows 1 and 2 are both prompt_id 'a' response_idx 1"):
        join_scores(generations(["a", "a"], [0, 1], ["x", "y"]), scores_table(["a", "a", "a"], [0, 1, 1], [1.0, 0.0, 0.5]),
                    "g", "scores.parquet")


def test_truncated_responses_carry_no_end_of_turn_token(tok):
    """A response cut at max_new_tokens keeps exactly its sampled ids: no EOS is appended, and its
    finish reason travels into the pairs file."""
    table, counts = run(tok, {"p": [(0, "Finished answer.", 1.0, "stop"), (1, "A cut answer that goes on", 0.0, "length")]})
    row = table.to_pylist()[0]
    assert row["chosen_ids"] == sampled(tok, "Finished answer.") and row["chosen_ids"][-1] == tok.eos_token_id
    assert row["rejected_ids"] == list(tok("A cut answer that goes on", add_special_tokens=False)["input_ids"])
    assert tok.eos_token_id not in row["rejected_ids"]
    assert (row["chosen_finish_reason"], row["rejected_finish_reason"]) == ("stop", "length")
    assert counts["rejected_truncated_share"] == 1.0 and counts["chosen_truncated_share"] == 0.0
