"""report: the MLflow record of the completed pipeline: a parent run (params, the IFEval benchmark's
headline figures with their intervals, every pipeline-level stage's metrics, the per-iteration
validation figures as step metrics (step = iteration), the benchmark comparison table and example
responses, plots, the prompt datasets (digest = DVC md5), the final policy as a logged model,
``params.yaml`` and ``dvc.lock``) and one child run per iteration (its stages' metrics and its
training curve, step = update).

A stage of its own, after evaluation: when the tracking server is down, every DVC output is
already written and cached, and rerunning ``dvc repro`` reruns only this stage.
"""

from pathlib import Path

import pyarrow as pa
import yaml

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.params import PARAMS_FILE, load_params
from rlhf_pipeline.report import benchmark_columns, example_responses, figures, read_metrics_files, read_tsv
from rlhf_pipeline.tracking import (DatasetRecord, PipelineRecord, RunRecord, dvc_output_md5s, log_pipeline_run,
                                    project_root)

#: Metrics files of each iteration's stages, under ``<metrics>/<iteration>/``.
ITERATION_STAGES = ("generate", "score", "pairs", "ref_logprobs", "train")


def metrics_files(metrics: Path) -> dict[str, Path]:
    """The pipeline-level stages' metrics files (the parent run's), labelled as its metrics are prefixed."""
    return {"prepare_model": metrics / "prepare_model.json", "prepare_prompts": metrics / "prepare_prompts.json",
            "evaluate_base": metrics / "eval" / "base.json", "evaluate": metrics / "eval.json",
            "benchmark_base": metrics / "benchmark" / "base.json", "benchmark": metrics / "benchmark" / "final.json"}


def iteration_files(metrics: Path, name: str) -> dict[str, Path]:
    """One iteration's stages' metrics files (its child run's), labelled by stage."""
    files = {stage: metrics / name / f"{stage}.json" for stage in ITERATION_STAGES}
    files["evaluate"] = metrics / "eval" / f"{name}.json"
    return files


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "metrics", "test-table", "benchmark-table", "lock")
    params = load_params()  # validated like every stage; logged as written
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    metrics, names = Path(args.metrics), list(params.iterations)
    pipeline = read_metrics_files(metrics_files(metrics))
    train_logs = {name: read_tsv(metrics / "train_log" / f"{name}.tsv") for name in names}
    children = [RunRecord(name, metrics=read_metrics_files(iteration_files(metrics, name)),
                          curves={"train_log": ("update", train_logs[name])}, tags={"rlhf.iteration": name})
                for name in names]
    iterations = read_tsv(metrics / "eval_iterations.tsv")
    table = read_parquet(args.test_table, {"base_reward": pa.float64(), "trained_reward": pa.float64()})
    bench = benchmark_columns(read_parquet(args.benchmark_table))
    lock = Path(args.lock)
    md5s = dvc_output_md5s(lock)
    counts = pipeline["prepare_prompts"]
    bm = pipeline["benchmark"]
    headline = {"ifeval": bm["ifeval"],
                "mean_response_tokens": {p: bm[p]["mean_response_tokens"] for p in ("base", "trained")},
                "truncated_share": {p: bm[p]["truncated_share"] for p in ("base", "trained")}}
    il = bm["ifeval"]["instruction_level_loose"]
    note = (f"IFEval benchmark ({bm['prompts']} prompts, greedy, {bm['max_new_tokens']} new tokens), "
            f"instruction-level loose accuracy: base {100 * il['base']:.1f} %, models/{names[-1]} "
            f"{100 * il['trained']:.1f} %, difference {100 * il['diff']:+.1f} points "
            f"[{100 * il['ci_low']:+.1f}, {100 * il['ci_high']:+.1f}] ({100 * bm['confidence']:.0f} % bootstrap over "
            "prompts). Metrics ifeval.*: all four figures and the card's average; child runs: one per iteration.")
    record = PipelineRecord(
        params=raw,
        parent=RunRecord("", metrics={"": headline, **pipeline}, curves={"validation": ("iteration", iterations)},
                         tags={"rlhf.policy": f"models/{names[-1]}", "mlflow.note.content": note}),
        children=children,
        artifacts=[Path(args.test_table), Path(PARAMS_FILE), lock],
        plots=figures(train_logs, iterations, table.column("base_reward").to_pylist(),
                      table.column("trained_reward").to_pylist()),
        tables={"benchmark_comparison.json": bench},
        texts={"benchmark_examples.md": example_responses(bench)},
        datasets=[DatasetRecord(f"prompts/{split}", f"data/prompts/{split}.parquet",
                                md5s[f"data/prompts/{split}.parquet"], context, counts[f"{split}_prompts"])
                  for split, context in (("train", "training"), ("val", "validation"), ("test", "test"))]
        + [DatasetRecord("ifeval-responses/base", "data/benchmark/base.parquet", md5s["data/benchmark/base.parquet"],
                         "benchmark", bm["prompts"])],
        model=(f"policy-{names[-1]}", f"models/{names[-1]}", md5s[f"models/{names[-1]}"]),
    )
    log_pipeline_run(record, project_root(), lock)


if __name__ == "__main__":
    run_stage(main)
