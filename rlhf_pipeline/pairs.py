"""Chosen/rejected pairs (REBEL recipe, part 3): token limits, argmax/argmin reward, tokenizing.

Per prompt, chosen = the response with the highest reward and rejected = the one with the lowest
(ties go to the lowest ``response_idx``), as in the REBEL reference's filter-and-tokenize step.
Response token ids are those sampled (``generation.response_token_ids``: the end-of-turn token
only where it was generated), copied from the generations file, never re-tokenized from text.
Token ids are stored unpadded; padding happens per micro-batch in training.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import PairsParams
from rlhf_pipeline.schemas import PAIRS


#: Why a prompt yields no pair, in the order the filters run.
DROP_REASONS = ("prompt_too_long", "response_too_long", "too_few_responses", "identical_texts",
                "reward_tie", "below_min_reward_gap")


@dataclass(frozen=True)
class Candidate:
    """One scored response of a prompt: its text, reward, and token ids as sampled."""

    response_idx: int
    text: str
    reward: float
    ids: list[int]
    finish_reason: str


def keyed_rows(table: pa.Table, columns: tuple[str, ...], where: str) -> dict[tuple[str, int], tuple]:
    """``{(prompt_id, response_idx): (values of columns)}`` of a generations or scores table.

    Raises:
        PipelineError: a ``(prompt_id, response_idx)`` appears twice (the key and both rows named):
            two rows for one response would otherwise merge silently.
    """
    keys = zip(table.column("prompt_id").to_pylist(), table.column("response_idx").to_pylist())
    values = zip(*(table.column(c).to_pylist() for c in columns))
    out: dict[tuple[str, int], tuple] = {}
    first_row: dict[tuple[str, int], int] = {}
    for row, (key, value) in enumerate(zip(keys, values)):
        if key in out:
            raise PipelineError(f"{where}: rows {first_row[key]} and {row} are both prompt_id {key[0]!r} "
                                f"response_idx {key[1]}; each response must appear once")
        out[key], first_row[key] = value, row
    return out


def join_scores(generations: pa.Table, scores: pa.Table, generations_where: str, scores_where: str
                ) -> dict[str, list[Candidate]]:
    """Per prompt_id, its scored responses, checking both files cover the same rows once each.

    Args:
        generations: ``prompt_id``, ``response_idx``, ``response``, ``token_ids``, ``finish_reason``.
        scores: ``prompt_id``, ``response_idx``, ``reward``.
        generations_where, scores_where: the files' names for error messages.

    Raises:
        PipelineError: a duplicate ``(prompt_id, response_idx)`` in either file, a response without
            a score or a score without a response (named).
    """
    g = keyed_rows(generations, ("response", "token_ids", "finish_reason"), generations_where)
    s = keyed_rows(scores, ("reward",), scores_where)
    if g.keys() != s.keys():
        extra, missing = sorted(s.keys() - g.keys()), sorted(g.keys() - s.keys())
        raise PipelineError(f"{generations_where} / {scores_where}: generations and scores disagree: unscored "
                            f"responses {missing[:3]}, scores without a response {extra[:3]} (rerun the score stage)")
    out: dict[str, list[Candidate]] = defaultdict(list)
    for (pid, idx), (text, ids, finish) in sorted(g.items()):
        out[pid].append(Candidate(idx, text, s[(pid, idx)][0], ids, finish))
    return out


def build_pairs(responses: dict[str, list[Candidate]], prompts: dict[str, str], tokenizer,
                cfg: PairsParams) -> tuple[pa.Table, dict]:
    """One chosen/rejected pair per prompt that survives the filters.

    Filters, in order: the prompt's chat-formatted length exceeds ``max_prompt_tokens``
    (generation prompt included); responses whose sampled tokens (end-of-turn included where it
    was generated) exceed ``max_response_tokens`` are dropped, and a prompt left with fewer than two responses yields
    nothing; all texts identical; all rewards equal (argmax = argmin: no preference); chosen and
    rejected texts identical; reward gap below ``min_reward_gap``.

    Returns:
        (pairs table, ``schemas.PAIRS``, sorted by prompt_id; counts and means for the metrics file).

    Raises:
        PipelineError: a response's prompt is unknown, or every prompt was filtered out (the
            message gives the count per filter).
    """
    missing = sorted(responses.keys() - prompts.keys())
    if missing:
        raise PipelineError(f"responses for prompts not in the prompt file: {missing[:5]}")
    counts = {"prompts_in": len(responses), "responses_in": sum(len(v) for v in responses.values()),
              "responses_dropped_too_long": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}}
    rows = []
    for pid in sorted(responses):
        prompt_ids = prompt_token_ids(tokenizer, prompts[pid])
        if len(prompt_ids) > cfg.max_prompt_tokens:
            counts["dropped_prompt_too_long"] += 1
            continue
        cands = [c for c in responses[pid] if len(c.ids) <= cfg.max_response_tokens]
        counts["responses_dropped_too_long"] += len(responses[pid]) - len(cands)
        if len(cands) < 2:
            reason = "response_too_long" if len(cands) < len(responses[pid]) else "too_few_responses"
            counts[f"dropped_{reason}"] += 1
            continue
        chosen = min(cands, key=lambda c: (-c.reward, c.response_idx))
        rejected = min(cands, key=lambda c: (c.reward, c.response_idx))
        gap = chosen.reward - rejected.reward
        if len({c.text for c in cands}) == 1:
            reason = "identical_texts"  # e.g. a prompt every sample answers the same way
        elif chosen.response_idx == rejected.response_idx:
            reason = "reward_tie"  # all rewards equal: argmax and argmin are the same response
        elif chosen.text == rejected.text:
            reason = "identical_texts"  # a scorer that is not a function of the text
        elif gap < cfg.min_reward_gap:
            reason = "below_min_reward_gap"
        else:
            reason = None
        if reason:
            counts[f"dropped_{reason}"] += 1
            continue
        rows.append({"prompt_id": pid, "prompt_ids": prompt_ids, "chosen_ids": chosen.ids,
                     "rejected_ids": rejected.ids, "chosen": chosen.text, "rejected": rejected.text,
                     "chosen_reward": chosen.reward, "rejected_reward": rejected.reward,
                     "chosen_response_idx": chosen.response_idx, "rejected_response_idx": rejected.response_idx,
                     "chosen_finish_reason": chosen.finish_reason, "rejected_finish_reason": rejected.finish_reason})
    counts["pairs_out"] = len(rows)
    if not rows:
        why = ", ".join(f"{counts[f'dropped_{r}']} {r.replace('_', ' ')}" for r in DROP_REASONS)
        raise PipelineError(f"no pairs left: every one of {counts['prompts_in']} prompts was filtered out ({why}); "
                            "check pairs.* limits and the reward spread in metrics/score.json")
    counts.update({
        "mean_reward_gap": round(statistics.fmean(r["chosen_reward"] - r["rejected_reward"] for r in rows), 6),
        "mean_chosen_tokens": round(statistics.fmean(len(r["chosen_ids"]) for r in rows), 2),
        "mean_rejected_tokens": round(statistics.fmean(len(r["rejected_ids"]) for r in rows), 2),
        "mean_prompt_tokens": round(statistics.fmean(len(r["prompt_ids"]) for r in rows), 2),
        "chosen_truncated_share": round(statistics.fmean(r["chosen_finish_reason"] == "length" for r in rows), 4),
        "rejected_truncated_share": round(statistics.fmean(r["rejected_finish_reason"] == "length" for r in rows), 4),
    })
    return pa.Table.from_pylist(rows, schema=PAIRS), counts
