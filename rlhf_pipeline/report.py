"""What the ``report`` stage gathers from a finished pipeline for its MLflow run: every stage's
metrics file, the training curve, the evaluation table and plots of both."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError

#: Stages whose ``metrics/<stage>.json`` the run records, in pipeline order.
STAGES = ("prepare_model", "prepare_prompts", "generate", "score", "pairs", "ref_logprobs", "train", "evaluate")
_METRICS_NAMES = {"evaluate": "eval"}


def metrics_file(metrics_dir: Path, stage: str) -> Path:
    """``metrics/<stage>.json`` (``metrics/eval.json`` for ``evaluate``)."""
    return metrics_dir / f"{_METRICS_NAMES.get(stage, stage)}.json"


def read_stage_metrics(metrics_dir: Path) -> dict[str, dict]:
    """``{stage: metrics}`` for every stage of :data:`STAGES`.

    Raises:
        PipelineError: a metrics file is missing or not JSON (names it).
    """
    out = {}
    for stage in STAGES:
        path = metrics_file(metrics_dir, stage)
        try:
            out[stage] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: cannot read the {stage} stage's metrics ({exc})") from None
    return out


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Rows of a tab-separated file with a header; numbers parsed as float.

    Raises:
        PipelineError: the file is missing.
    """
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc})") from None
    return [{k: _number(v) for k, v in r.items()} for r in rows]


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def figures(train_rows: list[dict[str, Any]], base_rewards: list[float], trained_rewards: list[float]) -> dict:
    """Matplotlib figures: ``training_curves.png`` (loss, KL, sign agreement per update) and
    ``reward_distribution.png`` (held-out rewards, base vs trained)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in stages
    import matplotlib.pyplot as plt

    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [r["update"] for r in train_rows]
    axes[0].plot(steps, [r["loss"] for r in train_rows])
    axes[0].set(title="loss", xlabel="update")
    axes[1].plot(steps, [r["kl_chosen"] for r in train_rows], label="chosen")
    axes[1].plot(steps, [r["kl_rejected"] for r in train_rows], label="rejected")
    axes[1].set(title="log πθ − log π0 (nats)", xlabel="update")
    axes[1].legend()
    axes[2].plot(steps, [r["sign_agreement"] for r in train_rows])
    axes[2].set(title="sign agreement", xlabel="update", ylim=(-0.05, 1.05))
    fig.tight_layout()
    out["training_curves.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([base_rewards, trained_rewards], bins=10, label=["base", "trained"])
    ax.set(title="held-out reward", xlabel="reward", ylabel="responses")
    ax.legend()
    fig.tight_layout()
    out["reward_distribution.png"] = fig
    return out
