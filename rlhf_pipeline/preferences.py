"""Preference pairs for a reward model (the ``reward_model`` stage): a prompt, a chosen and a rejected
response, and an optional margin.

Sources (``reward_model.source``): the pipeline's own scored responses (every pair of a prompt's
responses whose rewards differ; chosen = the higher), or a file or dataset in the standard
``prompt``/``chosen``/``rejected`` format (TRL's and UltraFeedback-binarized's: each a text, or chat
messages, where ``chosen``/``rejected`` may repeat the prompt's turns before the response), with an
optional ``margin`` column (Llama 2's margin). :func:`split_preferences` tokenizes each side as the
whole conversation in the reward model's chat template, exactly as the ``sequence-classification``
scorer does, and draws the training and held-out sets.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from rlhf_pipeline.chat import chat_messages, chat_token_ids, has_control_tokens
from rlhf_pipeline.data import check_text, draw_held_out, open_hf_dataset, read_records
from rlhf_pipeline.demonstrations import chat_turns
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import RewardModelParams


@dataclass(frozen=True)
class Preference:
    """One comparison: the conversation before the responses (``prompt``, chat messages), the
    preferred and the other response (texts), and the margin m of the loss (0: none)."""

    prompt: tuple[tuple[str, str], ...]  # (role, content) turns, hashable
    chosen: str
    rejected: str
    margin: float = 0.0

    def conversation(self, response: str) -> list[dict[str, str]]:
        return [*({"role": r, "content": c} for r, c in self.prompt), {"role": "assistant", "content": response}]


def _turns(value: Any, where: str, name: str) -> list[tuple[str, str]]:
    """A text as one user turn, or chat messages as (role, content) turns."""
    if isinstance(value, str):
        return [(m["role"], m["content"]) for m in chat_messages(check_text(value, where, name))]
    return [(m["role"], m["content"]) for m in chat_turns(value, where, name)]


def _response(value: Any, prompt: list[tuple[str, str]], where: str, name: str) -> str:
    """The response text of ``chosen``/``rejected``: a text, or messages that repeat the prompt's
    turns (or none of them) and end with the assistant's."""
    if isinstance(value, str):
        return check_text(value, where, name)
    turns = _turns(value, where, name)
    if turns[-1][0] != "assistant":
        raise PipelineError(f"{where}: field {name!r} must end with the assistant's turn")
    if turns[:-1] and turns[:-1] != prompt:
        raise PipelineError(f"{where}: the turns of {name!r} before its response are not the prompt's")
    return turns[-1][1]


def to_preference(record: dict[str, Any], where: str) -> Preference:
    """One ``prompt``/``chosen``/``rejected`` (+ optional ``margin``) record.

    Raises:
        PipelineError: naming ``where``: a missing or empty field, malformed messages, a non-finite
            margin, or a pair whose two responses are the same text (nothing to prefer).
    """
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise PipelineError(f"{where}: a preference record needs prompt, chosen and rejected; missing {missing}")
    prompt = _turns(record["prompt"], where, "prompt")
    if prompt[-1][0] != "user":
        raise PipelineError(f"{where}: the prompt must end with a user turn")
    chosen = _response(record["chosen"], prompt, where, "chosen")
    rejected = _response(record["rejected"], prompt, where, "rejected")
    if chosen == rejected:
        raise PipelineError(f"{where}: chosen and rejected are the same text")
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise PipelineError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    return Preference(tuple(prompt), chosen, rejected, float(margin))


def preferences(records: Iterable[tuple[str, dict[str, Any]]]) -> list[Preference]:
    """:func:`to_preference` of every (where, record).

    Raises:
        PipelineError: see :func:`to_preference`; or no records.
    """
    out = [to_preference(rec, where) for where, rec in records]
    if not out:
        raise PipelineError("reward_model: the source holds no preference records")
    return out


def from_generations(prompts: dict[str, str], generations: pa.Table, scores: pa.Table, min_reward_gap: float
                     ) -> tuple[list[Preference], dict[str, int]]:
    """Every pair of a prompt's responses whose rewards differ by more than ``min_reward_gap``
    (exact ties always dropped), the higher-reward one chosen; pairs whose two texts are equal are
    dropped (counted). Prompts in ``prompt_id`` order, pairs in response order.

    Args:
        prompts: prompt_id -> prompt text. generations, scores: the ``generate`` and ``score``
            tables of one iteration (rows matched on prompt_id and response_idx).

    Raises:
        PipelineError: a generation without its score, or a prompt id not among the prompts.
    """
    reward = {(p, i): r for p, i, r in zip(scores.column("prompt_id").to_pylist(),
                                           scores.column("response_idx").to_pylist(),
                                           scores.column("reward").to_pylist())}
    by_prompt: dict[str, list[tuple[int, str, float]]] = {}
    for pid, idx, text in zip(generations.column("prompt_id").to_pylist(),
                              generations.column("response_idx").to_pylist(),
                              generations.column("response").to_pylist()):
        if (pid, idx) not in reward:
            raise PipelineError(f"reward_model: response {idx} of prompt {pid} has no score")
        if pid not in prompts:
            raise PipelineError(f"reward_model: prompt {pid} of the generations is not among the prompts")
        by_prompt.setdefault(pid, []).append((idx, text, reward[(pid, idx)]))
    out, ties, identical = [], 0, 0
    for pid in sorted(by_prompt):
        rows = sorted(by_prompt[pid])
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                (_, ta, ra), (_, tb, rb) = rows[a], rows[b]
                if abs(ra - rb) <= min_reward_gap or ra == rb:
                    ties += 1
                    continue
                if ta == tb:
                    identical += 1
                    continue
                chosen, rejected = (ta, tb) if ra > rb else (tb, ta)
                turns = tuple((m["role"], m["content"]) for m in chat_messages(prompts[pid]))
                out.append(Preference(turns, chosen, rejected))
    if not out:
        raise PipelineError("reward_model: the generations give no pair with different rewards")
    return out, {"prompts": len(by_prompt), "pairs_dropped_reward_gap": ties, "pairs_dropped_identical_texts": identical}


def load_source(cfg: RewardModelParams, sources_dir: str | Path | None = None
                ) -> tuple[list[Preference], dict]:
    """The preferences of a ``file`` or ``huggingface`` source (``generations``: :func:`from_generations`),
    and facts for the metrics (a dataset's fingerprint).

    Raises:
        PipelineError: see the readers and :func:`to_preference`.
    """
    if cfg.source == "file":
        return preferences(read_records(cfg.path, "reward_model.path", sources_dir)), {}
    if cfg.source == "huggingface":
        ds, where, facts = open_hf_dataset(cfg.dataset, cfg.config_name, cfg.split, cfg.data_files, "reward_model",
                                           sources_dir)
        return preferences((f"{where}: row {i}", rec) for i, rec in enumerate(ds)), facts
    raise PipelineError(f"reward_model.source: {cfg.source!r} is not read from a file or dataset")


@dataclass
class PreferenceSplit:
    """Tokenized pairs: ``train`` and ``val`` hold (chosen_ids, rejected_ids, margins) lists."""

    train: tuple[list[list[int]], list[list[int]], list[float]]
    val: tuple[list[list[int]], list[list[int]], list[float]]
    counts: dict[str, int] = field(default_factory=dict)

    def digest(self) -> bytes:
        """SHA-256 of both sets, in order (part of the checkpoint fingerprint)."""
        return hashlib.sha256(json.dumps([self.train, self.val]).encode()).digest()


def split_preferences(tokenizer, prefs: list[Preference], cfg: RewardModelParams, seed: int) -> PreferenceSplit:
    """Tokenize each side as the whole conversation in the chat template (as the scorer does:
    ``rewards.sequence_classification.conversation_ids``), drop duplicates and pairs whose longer
    side exceeds ``reward_model.max_tokens``, draw ``reward_model.num_prompts`` prompts (seeded) and
    hold out every pair of the first ``reward_model.val_size`` of them.

    The split is by prompt: pairs of one prompt share responses (the ``generations`` source makes
    up to six pairs of four responses), so a pair-level split would score held-out pairs on
    responses seen in training. The draw is a seeded permutation of the prompts sorted by the
    SHA-256 of their turns, so it does not depend on the source's row order; pairs are in the order
    of their token ids' SHA-256.

    Raises:
        PipelineError: naming ``reward_model.num_prompts`` / ``reward_model.val_size`` when too few
            prompts have a pair that fits.
    """
    keyed: dict[str, tuple[list[int], list[int], float]] = {}
    prompt_of: dict[str, str] = {}
    too_long = control_tokens = 0
    for p in prefs:
        if has_control_tokens(tokenizer, p.conversation(p.chosen) + p.conversation(p.rejected)[-1:]):
            control_tokens += 1  # it would forge chat turns (rlhf_pipeline.chat)
            continue
        chosen = chat_token_ids(tokenizer, p.conversation(p.chosen))
        rejected = chat_token_ids(tokenizer, p.conversation(p.rejected))
        if max(len(chosen), len(rejected)) > cfg.max_tokens:
            too_long += 1
            continue
        key = hashlib.sha256(json.dumps([chosen, rejected, p.margin]).encode()).hexdigest()
        keyed.setdefault(key, (chosen, rejected, p.margin))
        prompt_of[key] = hashlib.sha256(json.dumps(p.prompt).encode()).hexdigest()
    train_prompts, val_prompts = draw_held_out(
        set(prompt_of.values()), cfg.num_prompts, cfg.val_size, seed, num_key="reward_model.num_prompts",
        val_key="reward_model.val_size",
        what=f"prompts with a distinct pair within reward_model.max_tokens={cfg.max_tokens} ({too_long} pairs longer)")

    def columns(prompts):
        rows = [keyed[k] for k in sorted(keyed) if prompt_of[k] in prompts]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    train, val = columns(set(train_prompts)), columns(set(val_prompts))
    counts = {"source_pairs": len(prefs), "dropped_too_long": too_long, "dropped_control_tokens": control_tokens,
              "duplicates_dropped": len(prefs) - too_long - control_tokens - len(keyed), "train_prompts": len(train_prompts),
              "val_prompts": len(val_prompts), "train_pairs": len(train[0]), "val_pairs": len(val[0])}
    return PreferenceSplit(train, val, counts)
