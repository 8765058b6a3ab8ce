"""A learned reward model as the training reward, checked against the configured scorers.

The classic RLHF variant (Ouyang et al. 2022) optimises a Bradley–Terry reward model's score, a
proxy for the reward that matters. Here the proxy is the pipeline's own ``reward_model`` output and
the ground truth is what ``reward.scorers`` configures (IFEval's verdicts on the default): the
score stage gives the proxy weight 1 and keeps every configured scorer's column at weight 0, so the
same responses carry both, and reports how often they agree. Gao, Schulman & Hilton (2022, "Scaling
Laws for Reward Model Overoptimization") measure overoptimisation as the gold reward falling while
the proxy keeps rising; agreement on the policy's own samples is where that gap starts.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pyarrow as pa

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.intervals import bootstrap_mean_ci
from rlhf_pipeline.params import RewardParams, ScorerChoice
from rlhf_pipeline.rewards import reward_column

PROXY = "sequence-classification"


def proxy_params(model_dir: str) -> RewardParams:
    """The reward model at ``model_dir`` as the one scorer (weight 1, default options: one logit,
    batches of 8 conversations, the device's dtype policy), no missing-EOS penalty."""
    proxy = ScorerChoice(name=PROXY, weight=1.0, options={"model": str(model_dir)})
    return RewardParams(scorers=[proxy], missing_eos_penalty=None)


def learned_reward_params(cfg: RewardParams, model_dir: str) -> RewardParams:
    """``cfg`` with the reward model at ``model_dir`` as the only weighted scorer.

    The proxy is a ``sequence-classification`` scorer with weight 1 and default options (one
    logit, batches of 8, the model's own dtype policy); every other configured scorer is kept with
    weight 0, so its ``reward_<name>`` column is there to compare with and the reward is the proxy
    alone. A configured ``sequence-classification`` scorer is replaced (one column per name).
    ``missing_eos_penalty`` is kept: it applies to the proxy as to any reward (TRL's
    ``missing_eos_penalty`` is used with reward models).

    Raises:
        PipelineError: no other scorer is left to check the proxy against.
    """
    gold = [ScorerChoice(**{**s.model_dump(), "weight": 0.0}) for s in cfg.scorers if s.name != PROXY]
    if not gold:
        raise PipelineError("reward.scorers: a learned reward model needs a ground-truth scorer to be checked "
                            "against (e.g. ifeval); only sequence-classification is configured")
    return cfg.model_copy(update={"scorers": [*proxy_params(model_dir).scorers, *gold]})


def reward_agreement(table: pa.Table, proxy: str, gold: str) -> dict:
    """How well the ``proxy`` column orders responses as the ``gold`` column does.

    Args:
        table: scored responses with ``prompt_id`` and the two columns (one row per response).
        proxy, gold: column names, e.g. ``reward_sequence_classification`` and ``reward_ifeval``.

    Returns:
        ``pairs``: pairs of responses to the same prompt whose gold values differ (only those can be
        ordered); ``pairwise_accuracy``: the share of them the proxy orders as gold does, a proxy tie
        counting one half (a reward model's held-out accuracy, Ouyang et al. 2022 Sec. 4, here on
        the policy's own samples; NaN when ``pairs`` is 0); ``prompts``: prompts with at least one
        such pair; ``pearson``: Pearson correlation of the two columns over all responses (NaN when
        either is constant).

    Raises:
        PipelineError: a column is missing.
    """
    missing = [c for c in ("prompt_id", proxy, gold) if c not in table.column_names]
    if missing:
        raise PipelineError(f"reward agreement: scored table has no column {missing}")
    by_prompt: dict[str, list[tuple[float, float]]] = {}
    for pid, p, g in zip(*(table.column(c).to_pylist() for c in ("prompt_id", proxy, gold))):
        by_prompt.setdefault(pid, []).append((p, g))
    pairs, agree, prompts = 0, 0.0, 0
    for rows in by_prompt.values():
        ordered = [(a, b) for a, b in itertools.combinations(rows, 2) if a[1] != b[1]]
        prompts += bool(ordered)
        for (p1, g1), (p2, g2) in ordered:
            pairs += 1
            agree += 0.5 if p1 == p2 else float((p1 > p2) == (g1 > g2))
    proxies, golds = table.column(proxy).to_pylist(), table.column(gold).to_pylist()
    try:
        pearson = statistics.correlation(proxies, golds)
    except statistics.StatisticsError:  # fewer than two rows, or a constant column
        pearson = math.nan
    return {"pairs": pairs, "prompts": prompts, "pairwise_accuracy": agree / pairs if pairs else math.nan,
            "pearson": pearson}


def agreement_metrics(table: pa.Table, cfg: RewardParams) -> dict:
    """:func:`reward_agreement` of the proxy with each weight-0 scorer of ``cfg`` (as
    :func:`learned_reward_params` builds it), flat for a metrics file:
    ``agreement_<name>_{pairs,prompts,pairwise_accuracy,pearson}``, floats to 6 places."""
    out = {}
    for scorer in cfg.scorers:
        if scorer.name == PROXY:
            continue
        for key, value in reward_agreement(table, reward_column(PROXY), reward_column(scorer.name)).items():
            out[f"agreement_{scorer.name}_{key}"] = round(value, 6) if isinstance(value, float) else value
    return out


def proxy_and_gold(comparison: pa.Table, proxy_base: list[float], proxy_trained: list[float], gold: str,
                   samples: int, confidence: float, seed: int) -> dict:
    """Proxy (learned reward) and gold (ground-truth reward) gains of a trained policy over the
    base policy on the same prompts: Gao, Schulman & Hilton (2022)'s two axes, at this policy's KL.

    Overoptimisation shows as a proxy gain with no (or a negative) gold gain; comparing policies
    at growing KL traces where the gold curve turns (their Fig. 1).

    Args:
        comparison: the evaluate stage's table (one row per prompt and response: ``prompt_id``,
            ``response_idx``, ``base_<gold>``, ``trained_<gold>``, ``kl``).
        proxy_base, proxy_trained: (rows,) the learned reward of each row's base and trained
            response.
        gold: the ground-truth column's suffix, e.g. ``reward_ifeval``.
        samples, confidence, seed: the percentile bootstrap over rows (:func:`bootstrap_mean_ci`).

    Returns:
        ``responses``; ``proxy_base``, ``proxy_trained``, ``proxy_gain`` (mean trained − base) and
        ``proxy_gain_ci``; the same four for ``gold``; ``kl`` (mean, nats per response); and
        :func:`reward_agreement` of proxy with gold over each row's (base, trained) pair (same
        prompt, same seed) as ``agreement_pairs`` / ``agreement_pairwise_accuracy``.

    Raises:
        PipelineError: lengths differ or a column is missing.
    """
    need = ["prompt_id", "response_idx", f"base_{gold}", f"trained_{gold}", "kl"]
    missing = [c for c in need if c not in comparison.column_names]
    if missing:
        raise PipelineError(f"proxy and gold: comparison table has no column {missing}")
    if not len(proxy_base) == len(proxy_trained) == comparison.num_rows:
        raise PipelineError(f"proxy and gold: {len(proxy_base)} and {len(proxy_trained)} proxy rewards for "
                            f"{comparison.num_rows} rows")
    out: dict = {"responses": comparison.num_rows}
    gold_base, gold_trained = (np.asarray(comparison.column(f"{side}_{gold}").to_pylist(), np.float64)
                               for side in ("base", "trained"))
    for name, base, trained in (("proxy", np.asarray(proxy_base, np.float64), np.asarray(proxy_trained, np.float64)),
                                ("gold", gold_base, gold_trained)):
        gain = trained - base
        out.update({f"{name}_base": float(base.mean()), f"{name}_trained": float(trained.mean()),
                    f"{name}_gain": float(gain.mean()),
                    f"{name}_gain_ci": list(bootstrap_mean_ci(gain, samples, confidence, seed))})
    out["kl"] = float(np.mean(comparison.column("kl").to_pylist()))
    ids = [f"{pid}#{idx}" for pid, idx in zip(*(comparison.column(c).to_pylist() for c in ("prompt_id", "response_idx")))]
    sides = pa.table({"prompt_id": ids + ids, "proxy": [*proxy_base, *proxy_trained],
                      "gold": [*gold_base.tolist(), *gold_trained.tolist()]})
    agreement = reward_agreement(sides, "proxy", "gold")
    out.update({"agreement_pairs": agreement["pairs"], "agreement_pairwise_accuracy": agreement["pairwise_accuracy"]})
    return out
