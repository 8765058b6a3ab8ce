"""Held-out comparison of the base and the trained policy (REBEL recipe, part 5).

Both policies answer the same test prompts with the same per-response seeds (common random
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
from rlhf_pipeline.params import EvaluateParams, GenerateParams, RewardParams

log = logging.getLogger(__name__)

POLICIES = ("base", "trained")
_KEYS = ("prompt_id", "response_idx")


def bootstrap_mean_ci(values: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13).

    Args:
        values: (prompts,) one value per test prompt; prompts are resampled with replacement.
        samples: number of resamples. confidence: e.g. 0.95. seed: seeds numpy's PCG64, so the
            interval is a function of its inputs.

    Returns:
        (low, high), which contain the sample mean whenever ``samples`` is not tiny.

    Raises:
        PipelineError: ``values`` is empty.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise PipelineError("bootstrap over no prompts: the test set is empty")
    rng = np.random.Generator(np.random.PCG64(seed))
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


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


def evaluate_policies(base_dir: str | Path, policy_dir: str | Path, test_prompts: pa.Table,
                      generate: GenerateParams, reward: RewardParams, cfg: EvaluateParams,
                      seed: int) -> tuple[pa.Table, dict]:
    """Generate from both policies on the test prompts, score, and compare.

    The KL estimate (``kl.mean``, nats per response) is the mean over the trained policy's own
    responses of Σ_t KL(πθ(·|x, y<t) ‖ π0(·|x, y<t)), the full-vocabulary KL summed along the
    response; ``kl.log_ratio_mean`` is the mean of log πθ(y|x) − log π0(y|x), the plain Monte-Carlo
    estimate of the same quantity with more variance (:func:`rlhf_pipeline.logprobs.response_kl`).
    Both use the logits divided by the sampling temperature, as the REBEL reference computes
    log-probs: they estimate KL(πθ ‖ π0) of those temperature-scaled policies, while the samples
    also pass the top-p filter, so neither is exactly the KL between the two nucleus samplers.
    With greedy decoding (temperature 0) both are taken at temperature 1 along the greedy
    responses: the KL the trained policy keeps from the base on its own outputs.

    Returns:
        (``data/eval.parquet`` table: one row per (prompt_id, response_idx), sorted, with the
        prompt, each policy's response, reward, scorer columns, tokens and finish reason, and
        the trained response's log-probs, log-ratio and KL; the ``metrics/eval.json`` dict).

    Raises:
        PipelineError: no test prompts, or a scorer lacks the prompt columns it needs (both
            before any generation).
    """
    from rlhf_pipeline.generation import run_generation
    from rlhf_pipeline.rewards import reward_summary, score_responses, validate_scorers

    where = "the test prompts"
    if test_prompts.num_rows == 0:
        raise PipelineError(f"{where}: no test prompts (data.test_size)")
    validate_scorers(reward, test_prompts, where)
    sampling = cfg.sampling(generate)
    prompts = dict(zip(test_prompts.column("prompt_id").to_pylist(), test_prompts.column("prompt").to_pylist()))
    order = sorted(prompts)
    pairs = [(pid, prompts[pid]) for pid in order]

    generations, scores, facts = {}, {}, {}
    for name, model_dir in zip(POLICIES, (base_dir, policy_dir)):
        log.info("evaluate: sampling %d x %d responses from %s", len(pairs), sampling.num_responses, model_dir)
        table, gen_metrics = run_generation(model_dir, pairs, sampling, seed)
        rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt_id", "response_idx", "response"))))
        t0 = time.perf_counter()
        score, _ = score_responses(rows, test_prompts, reward, where)
        generations[name], scores[name] = table, score
        facts[name] = {"generation_seconds": gen_metrics["seconds"],
                       "tokens_per_second": gen_metrics["tokens_per_second"],
                       "score_seconds": round(time.perf_counter() - t0, 3)}

    trained = generations["trained"]
    kl_rows = list(zip(*(trained.column(c).to_pylist() for c in ("prompt_id", "token_ids"))))
    temperature = sampling.temperature or 1.0
    t0 = time.perf_counter()
    kl = policy_kl(base_dir, policy_dir, prompts, kl_rows, temperature, cfg.logprob_batch_size, sampling.dtype)
    kl_seconds = time.perf_counter() - t0

    table = _eval_table(prompts, generations, scores, kl)
    means = {name: per_prompt_means(scores[name].column("prompt_id").to_pylist(),
                                    scores[name].column("reward").to_pylist(), order) for name in POLICIES}
    metrics: dict = {"test_prompts": len(order), "responses_per_prompt": sampling.num_responses,
                     "temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "confidence": cfg.confidence,
                     "bootstrap_samples": cfg.bootstrap_samples}
    metrics.update(paired_comparison(means["base"], means["trained"], cfg.bootstrap_samples, cfg.confidence, seed))
    for name in POLICIES:
        summary = reward_summary(scores[name])
        tokens = generations[name].column("num_tokens").to_pylist()
        finish = generations[name].column("finish_reason").to_pylist()
        metrics[name] = {
            "reward_mean": summary["reward_mean"], "reward_std": summary["reward_std"],
            **{k: v for k, v in summary.items() if k.startswith("ifeval_")},
            "mean_response_tokens": statistics.fmean(tokens),
            "truncated_share": sum(f == "length" for f in finish) / len(finish),
            **facts[name],
        }
    log_ratio = table.column("kl_log_ratio").to_pylist()
    metrics["kl"] = {"mean": statistics.fmean(kl["kl"]), "std": statistics.pstdev(kl["kl"]),
                     "per_token": sum(kl["kl"]) / max(1, sum(trained.column("num_tokens").to_pylist())),
                     "log_ratio_mean": statistics.fmean(log_ratio), "log_ratio_std": statistics.pstdev(log_ratio),
                     "seconds": round(kl_seconds, 3)}
    return table, _rounded(metrics)


def _eval_table(prompts: dict[str, str], generations: dict[str, pa.Table], scores: dict[str, pa.Table],
                kl: dict[str, list[float]]) -> pa.Table:
    """One row per (prompt_id, response_idx) with both policies' responses side by side.

    Generation tables come sorted by (prompt_id, response_idx) and score tables in the order of
    their rows, so all four align by position; checked, not assumed.
    """
    keys = [list(zip(*(t.column(c).to_pylist() for c in _KEYS))) for t in (*generations.values(), *scores.values())]
    if any(k != keys[0] for k in keys):
        raise PipelineError("evaluate: the two policies' responses do not cover the same prompts")
    base = generations["base"]
    columns: dict[str, pa.Array] = {"prompt_id": base.column("prompt_id"), "response_idx": base.column("response_idx"),
                                    "prompt": pa.array([prompts[pid] for pid in base.column("prompt_id").to_pylist()],
                                                       pa.string())}
    for name in POLICIES:
        for col in ("response", "num_tokens", "finish_reason", "seed"):
            columns[f"{name}_{col}"] = generations[name].column(col)
        for col in scores[name].column_names:
            if col not in _KEYS:
                columns[f"{name}_{col}"] = scores[name].column(col)
    columns["trained_logprob"] = pa.array(kl["policy"], pa.float64())
    columns["base_logprob_of_trained"] = pa.array(kl["reference"], pa.float64())
    columns["kl_log_ratio"] = pa.array([p - r for p, r in zip(kl["policy"], kl["reference"])], pa.float64())
    columns["kl"] = pa.array(kl["kl"], pa.float64())
    return pa.table(columns)


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
