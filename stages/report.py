"""report: one MLflow run for the completed pipeline (params, every stage's metrics, the training
curve of each iteration, the per-iteration validation figures as step metrics (step = iteration),
the test table, plots, ``params.yaml`` and ``dvc.lock``, md5 tags).

A stage of its own, after evaluation: when the tracking server is down, every DVC output is
already written and cached, and rerunning ``dvc repro`` reruns only this stage.
"""

from pathlib import Path

import pyarrow as pa
import yaml

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.params import PARAMS_FILE, load_params
from rlhf_pipeline.report import figures, read_metrics_files, read_tsv
from rlhf_pipeline.tracking import log_pipeline_run, project_root

#: Metrics files of each iteration's stages, under ``<metrics>/<iteration>/``.
ITERATION_STAGES = ("generate", "score", "pairs", "ref_logprobs", "train")


def metrics_files(metrics: Path, iterations: list[str]) -> dict[str, Path]:
    """Every stage's metrics file, labelled as its MLflow metrics are prefixed (dvc.yaml's layout)."""
    files = {"prepare_model": metrics / "prepare_model.json", "prepare_prompts": metrics / "prepare_prompts.json"}
    for name in iterations:
        files.update({f"{name}.{stage}": metrics / name / f"{stage}.json" for stage in ITERATION_STAGES})
        files[f"{name}.evaluate"] = metrics / "eval" / f"{name}.json"
    files["evaluate_base"] = metrics / "eval" / "base.json"
    files["evaluate"] = metrics / "eval.json"
    return files


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "metrics", "test-table", "lock")
    params = load_params()  # validated like every stage; logged as written
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    metrics, names = Path(args.metrics), list(params.iterations)
    stage_metrics = read_metrics_files(metrics_files(metrics, names))
    train_logs = {name: read_tsv(metrics / "train_log" / f"{name}.tsv") for name in names}
    iterations = read_tsv(metrics / "eval_iterations.tsv")
    table = read_parquet(args.test_table, {"base_reward": pa.float64(), "trained_reward": pa.float64()})
    plots = figures(train_logs, iterations, table.column("base_reward").to_pylist(),
                    table.column("trained_reward").to_pylist())
    curves = {f"{name}.train_log": ("update", rows) for name, rows in train_logs.items()}
    curves["validation"] = ("iteration", iterations)
    lock = Path(args.lock)
    log_pipeline_run(raw, stage_metrics, curves, [Path(args.test_table), Path(PARAMS_FILE), lock], plots,
                     project_root(), lock)


if __name__ == "__main__":
    run_stage(main)
