"""report: one MLflow run for the completed pipeline (params, every stage's metrics, the training
curve, the evaluation table and plots, ``params.yaml`` and ``dvc.lock``, md5 tags).

A stage of its own, after ``evaluate``: when the tracking server is down, every DVC output is
already written and cached, and rerunning ``dvc repro`` reruns only this stage.
"""

from pathlib import Path

import pyarrow as pa
import yaml

from rlhf_pipeline.cli import run_stage
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.params import PARAMS_FILE, load_params
from rlhf_pipeline.report import figures, read_stage_metrics, read_tsv
from rlhf_pipeline.tracking import log_pipeline_run, project_root

METRICS_DIR = Path("metrics")
TRAIN_LOG = Path("metrics/train_log.tsv")
EVAL = Path("data/eval.parquet")
LOCK = Path("dvc.lock")


def main() -> None:
    load_params()  # validated like every stage; logged as written
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    stage_metrics = read_stage_metrics(METRICS_DIR)
    curve = read_tsv(TRAIN_LOG)
    table = read_parquet(EVAL, {"base_reward": pa.float64(), "trained_reward": pa.float64()})
    plots = figures(curve, table.column("base_reward").to_pylist(), table.column("trained_reward").to_pylist())
    log_pipeline_run(raw, stage_metrics, curve, [EVAL, Path(PARAMS_FILE), LOCK], plots, project_root(), LOCK)


if __name__ == "__main__":
    run_stage(main)
