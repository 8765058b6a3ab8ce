"""Scoring responses (REBEL recipe, part 2): one file per scorer in this package, combined here.

The reward of a response is the weighted sum of its scorers' values (``reward.scorers``); each
scorer's raw value is kept in its own ``reward_<name>`` column. A scorer is a :class:`Scorer`
subclass with its params model as ``Params`` (a :class:`ScorerParams` with ``name:
Literal['<name>']``), registered with ``@SCORERS.register`` (``rlhf_pipeline.registry``) in
``rewards/<name>.py`` (``-`` written ``_``); this module never imports one, the registry imports
those ``reward.scorers`` names (docs/extending.md).
"""

from __future__ import annotations

import math
import statistics
import time

import pyarrow as pa
from pydantic import Field

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import Number, RewardParams, Section
from rlhf_pipeline.registry import SCORERS


def reward_column(scorer_name: str) -> str:
    """``reward_<name>`` with the name made a valid identifier (``sequence-classification`` ->
    ``reward_sequence_classification``)."""
    return "reward_" + scorer_name.replace("-", "_")


class ScorerParams(Section):
    """What every scorer's ``Params`` has besides its ``name``: its weight in the reward."""

    weight: Number = Field(1.0, description="the reward is the weighted sum of the scorers' values")


class Scorer:
    """A scorer of ``reward.scorers``, built from its validated ``Params`` (``cfg``).

    ``score`` returns ``(columns, facts)``: ``columns`` maps column names to arrays aligned with
    ``rows`` and holds :func:`reward_column` of the scorer's name (float, finite); ``facts`` go to
    the stage's metrics file prefixed by the name. ``validate`` raises ``PipelineError`` naming
    what the prompt table lacks, before any scoring; ``summarise`` gives the scorer's own figures
    over a scored table (IFEval's accuracies)."""

    Params: type

    def __init__(self, cfg):
        self.cfg = cfg

    def validate(self, prompts: pa.Table, where: str) -> None:
        """Nothing beyond ``prompt_id`` and ``prompt`` by default."""

    def score(self, prompts: dict[str, dict], rows: list[tuple[str, str]], progress: bool = True
              ) -> tuple[dict[str, pa.Array], dict]:
        """Score ``(prompt_id, response)`` rows; ``prompts``: prompt rows by id."""
        raise NotImplementedError

    def summarise(self, table: pa.Table) -> dict:
        """No figures of its own by default."""
        return {}


class Scorers:
    """The configured scorers of ``reward.scorers``, built once per stage (a reward model is loaded
    on first use and kept), combined into one reward: the weighted sum of their values."""

    def __init__(self, cfg: RewardParams, source: str = "params.yaml"):
        """Raises:
            PipelineError: an unknown scorer or a bad key of one (``reward.scorers.<i>.<key>``)."""
        self.cfg = cfg
        built = [SCORERS.build(s, f"reward.scorers.{i}", source) for i, s in enumerate(cfg.scorers)]
        self.scorers = [(scorer.cfg, scorer) for scorer in built]

    def validate(self, prompts: pa.Table, where: str) -> None:
        """Check, before any scoring, that every scorer has the prompt columns it needs.

        Raises:
            PipelineError: naming the scorer and what it needs.
        """
        for _, scorer in self.scorers:
            scorer.validate(prompts, where)

    def summarise(self, table: pa.Table) -> dict:
        """Each scorer's own figures over a scored table (IFEval's accuracies …)."""
        out: dict = {}
        for _, scorer in self.scorers:
            out.update(scorer.summarise(table))
        return out


def score_responses(rows: list[tuple[str, int, str]], prompts: pa.Table, scorers: Scorers | RewardParams,
                    where: str = "prompts", progress: bool = True) -> tuple[pa.Table, dict]:
    """Score (prompt_id, response_idx, response) rows with every scorer (``RewardParams`` builds
    the :class:`Scorers`; pass a built one to keep its models between calls).

    Returns:
        (table with ``prompt_id``, ``response_idx``, ``reward`` and each scorer's columns, in the
        order of ``rows``; facts for the metrics file: per-scorer seconds and extras).

    Raises:
        PipelineError: a scorer lacks what it needs (before scoring), a response's prompt is not
            among ``prompts``, or a reward is NaN or infinite (prompt and response named).
    """
    if isinstance(scorers, RewardParams):
        scorers = Scorers(scorers)
    scorers.validate(prompts, where)
    by_id = {r["prompt_id"]: r for r in prompts.to_pylist()}
    unknown = sorted({pid for pid, _, _ in rows} - by_id.keys())
    if unknown:
        raise PipelineError(f"{where}: responses for prompts not in the prompt file: {unknown[:5]}")
    texts = [(pid, resp) for pid, _, resp in rows]
    columns: dict[str, pa.Array] = {
        "prompt_id": pa.array([r[0] for r in rows], pa.string()),
        "response_idx": pa.array([r[1] for r in rows], pa.int32()),
    }
    facts: dict = {}
    total = [0.0] * len(rows)
    for cfg, scorer in scorers.scorers:
        t0 = time.perf_counter()
        cols, extra = scorer.score(by_id, texts, progress)
        facts.update({f"{cfg.name}_{k}": v for k, v in extra.items()})
        facts[f"{cfg.name}_seconds"] = round(time.perf_counter() - t0, 3)
        name = reward_column(cfg.name)
        for (pid, idx, _), value in zip(rows, cols[name].to_pylist()):
            if value is None or not math.isfinite(value):
                raise PipelineError(f"scorer {cfg.name!r} gave reward {value} to prompt {pid} response {idx}")
        total = [t + cfg.weight * v for t, v in zip(total, cols[name].to_pylist())]
        columns.update(cols)
    columns["reward"] = pa.array(total, pa.float64())
    order = ["prompt_id", "response_idx", "reward"] + [c for c in columns if c not in ("prompt_id", "response_idx", "reward")]
    return pa.table({c: columns[c] for c in order}), facts


def penalize_missing_eos(table: pa.Table, finish_reasons: list[str], penalty: float | None) -> pa.Table:
    """Subtract ``penalty`` from the ``reward`` of every response that ended at ``max_new_tokens``.

    A truncated response has no end-of-turn token, so the policy is never shown where to stop; the
    penalty makes "finish within the budget" part of the training reward. This is TRL's
    ``missing_eos_penalty``: a subtraction, so the score still ranks truncated responses among
    themselves. The REBEL reference does otherwise on TL;DR: it *replaces* a response's score with a
    constant (−1, or −4 in its online scripts) when no EOS was generated, so every truncated
    response ties. The subtraction is kept because pairs of two truncated responses still carry
    their scorers' signal; set the penalty large to approach the replacement. The scorers' raw
    columns are kept; ``missing_eos`` marks the penalised rows. ``penalty`` None returns the table
    unchanged.

    Args:
        finish_reasons: per row of ``table``, ``"stop"`` or ``"length"``.

    Raises:
        PipelineError: the lengths differ or a finish reason is neither.
    """
    if penalty is None:
        return table
    if len(finish_reasons) != table.num_rows:
        raise PipelineError(f"missing_eos_penalty: {len(finish_reasons)} finish reasons for {table.num_rows} rows")
    bad = sorted(set(finish_reasons) - {"stop", "length"})
    if bad:
        raise PipelineError(f"missing_eos_penalty: unknown finish_reason {bad[:3]}")
    missing = [f == "length" for f in finish_reasons]
    reward = [r - penalty if m else r for r, m in zip(table.column("reward").to_pylist(), missing)]
    table = table.set_column(table.column_names.index("reward"), "reward", pa.array(reward, pa.float64()))
    return table.append_column("missing_eos", pa.array(missing, pa.bool_()))


def reward_summary(table: pa.Table, scorers: Scorers | None = None) -> dict:
    """Mean/std/min/max reward, the share of prompts whose responses all tie, the share of
    penalised responses (when ``missing_eos`` is present) and each scorer's own figures
    (:meth:`Scorers.summarise`: IFEval's four accuracies)."""
    rewards = table.column("reward").to_pylist()
    per_prompt: dict[str, set] = {}
    for pid, r in zip(table.column("prompt_id").to_pylist(), rewards):
        per_prompt.setdefault(pid, set()).add(r)
    out = {
        "responses_scored": len(rewards),
        "prompts": len(per_prompt),
        "reward_mean": statistics.fmean(rewards) if rewards else float("nan"),
        "reward_std": statistics.pstdev(rewards) if rewards else float("nan"),
        "reward_min": min(rewards, default=float("nan")),
        "reward_max": max(rewards, default=float("nan")),
        "all_tied_prompt_share": sum(len(v) == 1 for v in per_prompt.values()) / max(1, len(per_prompt)),
    }
    if "missing_eos" in table.column_names:
        out["missing_eos_share"] = statistics.fmean(table.column("missing_eos").to_pylist()) if rewards else 0.0
    if scorers is not None:
        out.update(scorers.summarise(table))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}
