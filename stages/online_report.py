"""online_report: the MLflow record comparing the online algorithms (``online/dvc.yaml``): a parent run
(params, the offline iterations' evaluation ``offline.evaluate.*`` from ``--offline``, the default
pipeline's ``metrics/eval.json`` whatever its objective, a plot of reward and KL against the rollout episodes,
``params.yaml`` and ``online/dvc.lock`` with md5 tags) and one child run per algorithm (its training
and evaluation metrics ``train.*``, ``evaluate.val.*``, ``evaluate.test.*`` and its per-update
curves: reward, KL, entropy, losses … at step = update), so the UI compares the algorithms.

No DVC outputs, as ``report``: when the tracking server is down, everything else is cached and the
next ``dvc repro online/dvc.yaml`` reruns only this.
"""

from pathlib import Path

import yaml

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.params import PARAMS_FILE, load_params
from rlhf_pipeline.report import online_figures, read_metrics_files, read_tsv
from rlhf_pipeline.tracking import PipelineRecord, RunRecord, log_pipeline_run, project_root


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "metrics", "offline", "lock")
    params = load_params()
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    metrics, keys = Path(args.metrics), list(params.online.algorithms)
    train_logs = {key: read_tsv(metrics / "train_log" / f"{key}.tsv") for key in keys}
    children = [RunRecord(key, metrics=read_metrics_files({"train": metrics / key / "train.json",
                                                           "evaluate": metrics / "eval" / f"{key}.json"}),
                          curves={"train_log": ("update", train_logs[key])},
                          tags={"rlhf.algorithm": params.online.algorithms[key].name})
                for key in keys]
    lock = Path(args.lock)
    record = PipelineRecord(params=raw,
                            parent=RunRecord("", metrics=read_metrics_files({"offline.evaluate": Path(args.offline)})),
                            children=children, artifacts=[Path(PARAMS_FILE), lock], plots=online_figures(train_logs))
    log_pipeline_run(record, project_root(), lock)


if __name__ == "__main__":
    run_stage(main)
