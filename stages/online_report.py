"""online_report: one MLflow run comparing the online algorithms (``online/dvc.yaml``): params, each
algorithm's training and evaluation metrics (``<key>.train.*``, ``<key>.evaluate.val.*``,
``<key>.evaluate.test.*``), its per-update curves (reward, KL, entropy, losses … at step = update),
the offline iterated REBEL's evaluation (``--offline``, the default pipeline's ``metrics/eval.json``)
beside them, a plot of reward and KL against the rollout episodes, ``params.yaml`` and
``online/dvc.lock`` with md5 tags.

No DVC outputs, as ``report``: when the tracking server is down, everything else is cached and the
next ``dvc repro online/dvc.yaml`` reruns only this.
"""

from pathlib import Path

import yaml

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.params import PARAMS_FILE, load_params
from rlhf_pipeline.report import online_figures, read_metrics_files, read_tsv
from rlhf_pipeline.tracking import log_pipeline_run, project_root


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "metrics", "offline", "lock")
    params = load_params()
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    metrics, keys = Path(args.metrics), list(params.online.algorithms)
    files = {"offline_rebel.evaluate": Path(args.offline)}
    for key in keys:
        files[f"{key}.train"] = metrics / key / "train.json"
        files[f"{key}.evaluate"] = metrics / "eval" / f"{key}.json"
    stage_metrics = read_metrics_files(files)
    train_logs = {key: read_tsv(metrics / "train_log" / f"{key}.tsv") for key in keys}
    curves = {f"{key}.train_log": ("update", rows) for key, rows in train_logs.items()}
    lock = Path(args.lock)
    log_pipeline_run(raw, stage_metrics, curves, [Path(PARAMS_FILE), lock], online_figures(train_logs),
                     project_root(), lock)


if __name__ == "__main__":
    run_stage(main)
