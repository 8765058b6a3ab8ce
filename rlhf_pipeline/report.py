"""What the ``report`` stage gathers from a finished pipeline for its MLflow run: every stage's
metrics file, the training curves, the per-iteration evaluation table and plots of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError

def read_metrics_files(files: dict[str, Path]) -> dict[str, dict]:
    """``{label: metrics}`` for ``{label: JSON file}``, in the given order.

    Raises:
        PipelineError: a metrics file is missing or not JSON (names it and its label).
    """
    out = {}
    for label, path in files.items():
        try:
            out[label] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: cannot read the {label} metrics ({exc})") from None
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


def figures(train_logs: dict[str, list[dict[str, Any]]], iterations: list[dict[str, Any]],
            base_rewards: list[float], trained_rewards: list[float]) -> dict:
    """Matplotlib figures: ``training_curves.png`` (loss and KL of the chosen responses per update,
    one line per iteration), ``iterations.png`` (validation reward difference with its interval,
    win rate and KL against the iteration; iteration 0 is the base) and ``reward_distribution.png``
    (test rewards, base vs the last iteration)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in stages
    import matplotlib.pyplot as plt

    out = {"training_curves.png": _curves(train_logs, "update", {"loss": "loss",
                                                                 "kl_chosen": "chosen: log πθ − log π_ref (nats)"})}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    t = [r["iteration"] for r in iterations]
    axes[0].errorbar(t, [r["reward_diff"] for r in iterations],
                     yerr=[[r["reward_diff"] - r["reward_diff_ci_low"] for r in iterations],
                           [r["reward_diff_ci_high"] - r["reward_diff"] for r in iterations]], marker="o")
    axes[0].set(title="validation reward − base", xlabel="iteration")
    axes[1].plot(t, [r["win_rate_value"] for r in iterations], marker="o")
    axes[1].set(title="validation win rate vs base", xlabel="iteration", ylim=(-0.05, 1.05))
    axes[2].plot(t, [r["kl_mean"] for r in iterations], marker="o")
    axes[2].set(title="KL(π_t ‖ π0), nats per response", xlabel="iteration")
    fig.tight_layout()
    out["iterations.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([base_rewards, trained_rewards], bins=10, label=["base", "last iteration"])
    ax.set(title="test reward", xlabel="reward", ylabel="responses")
    ax.legend()
    fig.tight_layout()
    out["reward_distribution.png"] = fig
    return out


def online_figures(train_logs: dict[str, list[dict[str, Any]]]) -> dict:
    """``online.png``: each online algorithm's mean rollout reward and KL(πθ_old ‖ π_ref) (nats per
    response) against the episodes trained on (one line per algorithm)."""
    return {"online.png": _curves(train_logs, "episodes", {"reward": "rollout reward",
                                                          "kl": "KL(πθ_old ‖ π_ref), nats per response"})}


def _curves(train_logs: dict[str, list[dict[str, Any]]], x: str, panels: dict[str, str]):
    """One panel per ``{column: title}``, one line per training log (logs without the column are
    left out of its panel), against column ``x``."""
    import matplotlib

    matplotlib.use("Agg")  # no display in stages
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (column, title) in zip(axes, panels.items()):
        for name, rows in train_logs.items():
            if rows and column in rows[0]:
                ax.plot([r[x] for r in rows], [r[column] for r in rows], label=name)
        ax.set(title=title, xlabel=x)
        ax.legend()
    fig.tight_layout()
    return fig


#: Columns of the benchmark comparison table logged to MLflow (``log_table``), from the benchmark
#: stage's table (``data/benchmark/final.parquet``).
BENCHMARK_TABLE_COLUMNS = ("prompt_id", "prompt", "base_response", "trained_response", "base_ifeval_all_loose",
                           "trained_ifeval_all_loose", "base_reward", "trained_reward", "base_num_tokens",
                           "trained_num_tokens", "base_finish_reason", "trained_finish_reason")


def benchmark_columns(table) -> dict[str, list]:
    """The benchmark comparison as ``{column: values}`` (:data:`BENCHMARK_TABLE_COLUMNS`), rows in
    prompt-id order."""
    table = table.sort_by("prompt_id")
    return {c: table.column(c).to_pylist() for c in BENCHMARK_TABLE_COLUMNS}


def example_responses(columns: dict[str, list], gained: int = 3, lost: int = 2, chars: int = 1200) -> str:
    """Markdown: the first ``gained`` prompts (by id) where the trained policy follows every
    instruction (loose) and the base does not, then the first ``lost`` where it is the other way
    round, each with both responses cut at ``chars`` characters. Chosen by rule, not by hand."""
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    picks = [("gained", r) for r in rows if r["trained_ifeval_all_loose"] and not r["base_ifeval_all_loose"]][:gained]
    picks += [("lost", r) for r in rows if r["base_ifeval_all_loose"] and not r["trained_ifeval_all_loose"]][:lost]

    def cut(text: str) -> str:
        return text if len(text) <= chars else text[:chars] + " […]"

    out = ["# Example responses on the IFEval benchmark (greedy)", "",
           f"The first {gained} prompts (by id) the trained policy follows and the base does not, then the first "
           f"{lost} the other way round (loose, every instruction).", ""]
    for kind, r in picks:
        out += [f"## {kind}: prompt {r['prompt_id']}", "", "**Prompt**", "", "> " + cut(r["prompt"]).replace("\n", "\n> "),
                ""]
        for policy in ("base", "trained"):
            out += [f"**{policy}** ({r[f'{policy}_num_tokens']} tokens, {r[f'{policy}_finish_reason']}, "
                    f"followed: {r[f'{policy}_ifeval_all_loose']})", "", "```text", cut(r[f"{policy}_response"]), "```",
                    ""]
    return "\n".join(out)
