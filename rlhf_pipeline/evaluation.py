"""Held-out comparison of a trained policy with the base policy (REBEL recipe, part 5).

Both policies answer the same held-out prompts with the same per-response seeds (common random
numbers: the comparison is paired, so sampling noise shared by the two cancels), the same
scorers score them, and every comparison is a paired one over prompts with a seeded bootstrap
interval.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.intervals import bootstrap_mean_ci
from rlhf_pipeline.params import EvaluateParams, GenerateParams, SamplingParams
from rlhf_pipeline.rewards import Scorers

log = logging.getLogger(__name__)

POLICIES = ("base", "trained")
_KEYS = ("prompt_id", "response_idx")


def paired_comparison(base: np.ndarray, trained: np.ndarray, samples: int, confidence: float, seed: int) -> dict:
    """Mean reward of each policy, their difference and the win rate, with bootstrap intervals.

    Args:
        base, trained: (prompts,) mean reward per test prompt, same prompt order.

    Returns:
        ``{"reward": {"base", "trained", "diff", "diff_ci_low", "diff_ci_high"}`` (mean reward of
        each policy and of the per-prompt difference, reward units), ``"win_rate": {"value",
        "ci_low", "ci_high", "wins", "ties", "losses"}}`` (trained over base per prompt, a tie
        counting half; the counts are prompts).
    """
    base, trained = np.asarray(base, np.float64), np.asarray(trained, np.float64)
    diff = trained - base
    wins = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    d_low, d_high = bootstrap_mean_ci(diff, samples, confidence, seed)
    w_low, w_high = bootstrap_mean_ci(wins, samples, confidence, seed + 1)
    return {
        "reward": {"base": float(base.mean()), "trained": float(trained.mean()), "diff": float(diff.mean()),
                   "diff_ci_low": d_low, "diff_ci_high": d_high},
        "win_rate": {"value": float(wins.mean()), "ci_low": w_low, "ci_high": w_high,
                     "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum())},
    }


def per_prompt_means(prompt_ids: list[str], rewards: list[float], order: list[str]) -> np.ndarray:
    """(len(order),) mean reward of each prompt's responses, in the order of ``order``."""
    sums: dict[str, list[float]] = {}
    for pid, r in zip(prompt_ids, rewards):
        sums.setdefault(pid, []).append(r)
    return np.array([statistics.fmean(sums[pid]) for pid in order], dtype=np.float64)


def policy_kl(base_dir: str | Path, policy_dir: str | Path, prompts: dict[str, str],
              rows: list[tuple[str, list[int]]], temperature: float, batch_size: int,
              dtype_name: str) -> dict[str, list[float]]:
    """The trained policy's and the base policy's summed log-probs of (prompt_id, response token
    ids as sampled) rows and the full-vocabulary KL along each response, logits divided by
    ``temperature`` (:func:`rlhf_pipeline.logprobs.response_kl`; nats)."""
    from rlhf_pipeline.chat import prompt_token_ids
    from rlhf_pipeline.logprobs import response_kl
    from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, resolve_dtype

    tok = load_tokenizer(policy_dir)
    device = default_device()
    dtype = resolve_dtype(dtype_name, device)
    policy, base = (load_policy(d, torch.float32, device) for d in (policy_dir, base_dir))
    prompt_ids = {pid: prompt_token_ids(tok, text) for pid, text in prompts.items()}
    return response_kl(policy, base, [prompt_ids[pid] for pid, _ in rows], [ids for _, ids in rows], tok.pad_token_id,
                       temperature, batch_size, None if dtype == torch.float32 else dtype)


def sample_and_score(model_dir: str | Path, prompts: pa.Table, sampling: SamplingParams, scorers: Scorers,
                     seed: int, where: str) -> tuple[pa.Table, dict]:
    """Sample ``sampling.num_responses`` responses per prompt from a policy and score them.

    The seeds depend only on ``seed``, the prompt and the response index, so two policies given
    the same arguments answer with common random numbers (a paired comparison).

    Returns:
        (one row per (prompt_id, response_idx), sorted: the generation columns
        (``schemas.GENERATIONS``) and the score columns; facts: seconds and tokens/s).

    Raises:
        PipelineError: no prompts, or a scorer lacks the prompt columns it needs (both before any
            generation; ``where`` names the prompts).
    """
    from rlhf_pipeline.generation import run_generation
    from rlhf_pipeline.rewards import score_responses

    if prompts.num_rows == 0:
        raise PipelineError(f"{where}: no prompts")
    scorers.validate(prompts, where)
    texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    log.info("evaluate: sampling %d x %d responses from %s", len(texts), sampling.num_responses, model_dir)
    table, gen_metrics = run_generation(model_dir, [(pid, texts[pid]) for pid in sorted(texts)], sampling, seed)
    rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt_id", "response_idx", "response"))))
    t0 = time.perf_counter()
    scores, _ = score_responses(rows, prompts, scorers, where)
    for col in scores.column_names:
        if col not in _KEYS:
            table = table.append_column(col, scores.column(col))
    return table, {"generation_seconds": gen_metrics["seconds"], "tokens_per_second": gen_metrics["tokens_per_second"],
                   "score_seconds": round(time.perf_counter() - t0, 3)}


def policy_summary(table: pa.Table, scorers: Scorers) -> dict:
    """Reward mean and std, the scorers' own figures (IFEval's accuracies), mean response tokens and
    truncated share of a :func:`sample_and_score` table."""
    from rlhf_pipeline.rewards import reward_summary

    summary = reward_summary(table, scorers)
    finish = table.column("finish_reason").to_pylist()
    return {"reward_mean": summary["reward_mean"], "reward_std": summary["reward_std"],
            **{k: v for k, v in summary.items() if k.startswith("ifeval_")},
            "mean_response_tokens": statistics.fmean(table.column("num_tokens").to_pylist()),
            "truncated_share": sum(f == "length" for f in finish) / len(finish)}


def compare_with_base(base: pa.Table, base_dir: str | Path, policy_dir: str | Path, prompts: pa.Table,
                      generate: GenerateParams, scorers: Scorers, cfg: EvaluateParams, seed: int,
                      where: str, with_kl: bool = True) -> tuple[pa.Table, dict]:
    """Sample and score a policy on held-out prompts and compare it, paired, with the base policy's
    responses to the same prompts (``base``: rows of a :func:`sample_and_score` table, same seeds).

    The KL estimate (``kl.mean``, nats per response) is the mean over the policy's own responses
    of Σ_t KL(πθ(·|x, y<t) ‖ π0(·|x, y<t)), the full-vocabulary KL summed along the response;
    ``kl.log_ratio_mean`` is the mean of log πθ(y|x) − log π0(y|x), the plain Monte-Carlo estimate
    of the same quantity with more variance (:func:`rlhf_pipeline.logprobs.response_kl`). Both use
    the logits divided by the sampling temperature, as the REBEL reference computes log-probs:
    they estimate KL(πθ ‖ π0) of those temperature-scaled policies, while the samples also pass the
    top-p filter, so neither is exactly the KL between the two nucleus samplers. With greedy
    decoding (temperature 0) both are taken at temperature 1 along the greedy responses.

    ``with_kl=False`` leaves the KL out (its columns and ``kl``): two full forward passes over
    every response, which on the IFEval benchmark's 541 long responses cost as much as sampling them.

    Returns:
        (one row per (prompt_id, response_idx), sorted: the prompt, each policy's response,
        reward, scorer columns, tokens, finish reason and seed, and the policy response's
        log-probs, log-ratio and KL; the metrics dict: ``reward``/``win_rate`` of
        :func:`paired_comparison`, ``base``/``trained`` of :func:`policy_summary`, ``kl``).

    Raises:
        PipelineError: no prompts, a scorer lacks a column (before any generation), or ``base``
            does not hold the same (prompt, response, seed) rows (other prompts or settings).
    """
    sampling = cfg.sampling(generate)
    trained, facts = sample_and_score(policy_dir, prompts, sampling, scorers, seed, where)
    def keys(table):
        return list(zip(*(table.column(c).to_pylist() for c in (*_KEYS, "seed"))))

    base = base.sort_by([(k, "ascending") for k in _KEYS])
    if keys(base) != keys(trained):
        raise PipelineError(f"{where}: the base policy's evaluation responses are not for the same prompts, "
                            "responses and seeds; rerun evaluate_base")
    texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    order = sorted(texts)
    tables = {"base": base, "trained": trained}
    if not with_kl:
        table = _eval_table(texts, tables, None)
    else:
        kl_rows = list(zip(*(trained.column(c).to_pylist() for c in ("prompt_id", "token_ids"))))
        t0 = time.perf_counter()
        kl = policy_kl(base_dir, policy_dir, texts, kl_rows, sampling.temperature or 1.0, cfg.logprob_batch_size,
                       sampling.dtype)
        kl_seconds = time.perf_counter() - t0
        table = _eval_table(texts, tables, kl)
    means = {name: per_prompt_means(t.column("prompt_id").to_pylist(), t.column("reward").to_pylist(), order)
             for name, t in tables.items()}
    metrics: dict = {"prompts": len(order), "responses_per_prompt": sampling.num_responses,
                     "temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "confidence": cfg.confidence,
                     "bootstrap_samples": cfg.bootstrap_samples}
    metrics.update(paired_comparison(means["base"], means["trained"], cfg.bootstrap_samples, cfg.confidence, seed))
    metrics["base"] = policy_summary(base, scorers)
    metrics["trained"] = {**policy_summary(trained, scorers), **facts}
    if not with_kl:
        return table, _rounded(metrics)
    log_ratio = table.column("kl_log_ratio").to_pylist()
    metrics["kl"] = {"mean": statistics.fmean(kl["kl"]), "std": statistics.pstdev(kl["kl"]),
                     "per_token": sum(kl["kl"]) / max(1, sum(trained.column("num_tokens").to_pylist())),
                     "log_ratio_mean": statistics.fmean(log_ratio), "log_ratio_std": statistics.pstdev(log_ratio),
                     "seconds": round(kl_seconds, 3)}
    return table, _rounded(metrics)


def _eval_table(prompts: dict[str, str], tables: dict[str, pa.Table], kl: dict[str, list[float]] | None) -> pa.Table:
    """One row per (prompt_id, response_idx) with both policies' responses side by side (both
    tables sorted by the keys, checked by the caller); the KL columns when ``kl`` is given."""
    base = tables["base"]
    columns: dict[str, pa.Array] = {"prompt_id": base.column("prompt_id"), "response_idx": base.column("response_idx"),
                                    "prompt": pa.array([prompts[pid] for pid in base.column("prompt_id").to_pylist()],
                                                       pa.string())}
    for name in POLICIES:
        for col in tables[name].column_names:
            if col not in (*_KEYS, "token_ids", "split"):
                columns[f"{name}_{col}"] = tables[name].column(col)
    if kl is None:
        return pa.table(columns)
    columns["trained_logprob"] = pa.array(kl["policy"], pa.float64())
    columns["base_logprob_of_trained"] = pa.array(kl["reference"], pa.float64())
    columns["kl_log_ratio"] = pa.array([p - r for p, r in zip(kl["policy"], kl["reference"])], pa.float64())
    columns["kl"] = pa.array(kl["kl"], pa.float64())
    return pa.table(columns)


#: Per-iteration figures of ``metrics/eval.json`` and the ``dvc plots`` table, from a
#: :func:`compare_with_base` metrics dict (dotted paths).
ITERATION_FIGURES = ("reward.diff", "reward.diff_ci_low", "reward.diff_ci_high", "win_rate.value",
                     "trained.reward_mean", "trained.ifeval_prompt_accuracy_loose",
                     "trained.ifeval_prompt_accuracy_strict", "trained.ifeval_instruction_accuracy_loose",
                     "trained.ifeval_instruction_accuracy_strict", "trained.truncated_share",
                     "trained.mean_response_tokens", "kl.mean")


def iteration_rows(per_iteration: dict[str, dict]) -> list[dict]:
    """One row per iteration (``iteration`` = t) of :data:`ITERATION_FIGURES` (dots made ``_``),
    for ``dvc plots`` and MLflow step metrics; a figure absent from the metrics (no IFEval scorer)
    is left out.

    Args:
        per_iteration: ``{"iter_<t>": compare_with_base metrics}`` in iteration order.
    """
    from rlhf_pipeline.iterations import iteration_number

    rows = []
    for name, metrics in per_iteration.items():
        row: dict = {"iteration": iteration_number(name)}
        for path in ITERATION_FIGURES:
            value = metrics
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                row[path.replace(".", "_")] = value
        rows.append(row)
    return rows


def reward_histogram(table: pa.Table, bins: int = 10) -> list[dict]:
    """Counts of base and trained rewards in ``bins`` equal bins over their joint range.

    Returns:
        rows ``{"reward": bin centre, "base": count, "trained": count}`` for ``dvc plots``.
    """
    base = np.asarray(table.column("base_reward").to_pylist(), np.float64)
    trained = np.asarray(table.column("trained_reward").to_pylist(), np.float64)
    edges = np.histogram_bin_edges(np.concatenate([base, trained]), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    hb, _ = np.histogram(base, edges)
    ht, _ = np.histogram(trained, edges)
    return [{"reward": round(float(c), 6), "base": int(b), "trained": int(t)} for c, b, t in zip(centres, hb, ht)]


def _rounded(obj):
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isfinite(obj):
        return round(obj, 6)
    return obj
