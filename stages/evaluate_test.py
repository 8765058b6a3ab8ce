"""evaluate_test: the last iteration's policy against the base policy on the test prompts (once per
pipeline execution) + every iteration's validation metrics -> ``metrics/eval.json`` (the
per-iteration validation table and the test comparison), the ``dvc plots`` tables.

``--models`` is the folder holding ``base`` and ``iter_<t>``: the last item of ``iterations`` is
read from params, since dvc.yaml cannot name it.
"""

import json
from pathlib import Path

import pyarrow.compute as pc

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.evaluation import compare_with_base, iteration_rows, reward_histogram
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet, write_tsv
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.schemas import PROMPTS, columns


def read_iteration_metrics(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: <folder>/<name>.json}`` for each iteration name, in order.

    Raises:
        PipelineError: a file is missing or not JSON (named).
    """
    out = {}
    for name in names:
        path = folder / f"{name}.json"
        try:
            out[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: cannot read iteration {name}'s validation metrics ({exc})") from None
    return out


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "models", "base-responses", "prompts", "val-metrics", "out", "metrics", "plot",
                      "histogram")
    params = load_params()
    names = list(params.iterations)
    validation = read_iteration_metrics(Path(args.val_metrics), names)
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    base = read_parquet(args.base_responses, {"split": None})
    base = base.filter(pc.equal(base.column("split"), "test"))
    models = Path(args.models)
    table, test = compare_with_base(base, models / "base", models / names[-1], prompts, params.generate,
                                    Scorers(params.reward), params.evaluate, params.seed, args.prompts)
    rows = iteration_rows(validation)
    metrics = {"validation": {name: {k: v for k, v in row.items() if k != "iteration"}
                              for name, row in zip(names, rows)},
               "test": {"iteration": names[-1], **test}, "peak_rss_mb": peak_rss_mb()}
    # Iteration 0 is the base policy: no difference, a win rate of one half, no KL.
    base_row = {k: (0.5 if k == "win_rate_value" else 0.0) for k in rows[0] if k.startswith(("reward_", "win_", "kl_"))}
    base_row.update({k: validation[names[0]]["base"][k.removeprefix("trained_")]
                     for k in rows[0] if k.startswith("trained_")})
    with output_group():
        write_parquet(table, args.out)
        write_tsv([{"iteration": 0, **base_row}, *rows], tuple(rows[0]), args.plot)
        write_tsv(reward_histogram(table), ("reward", "base", "trained"), args.histogram)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
