"""train: base policy + pairs + reference log-probs -> ``models/policy/`` (REBEL by default).

Run as one process on CPU (``dvc repro``), or on several with
``accelerate launch [--config_file envs/accelerate/deepspeed_zero3.yaml] -m stages.train``: only the
main process writes the policy and the metrics.
"""

from pathlib import Path

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_tsv
from rlhf_pipeline.params import load_params
from rlhf_pipeline.training import TRAIN_LOG_COLUMNS, inputs_fingerprint, is_main_process, train_policy

MODEL = "models/base"
PAIRS = "data/pairs.parquet"
REF = "data/ref_logprobs.parquet"
OUT = "models/policy"
# Not a DVC output: resumable state of an interrupted run, removed when the stage completes.
CHECKPOINTS = "models/.checkpoints/train"
METRICS = "metrics/train.json"
LOG = "metrics/train_log.tsv"


def main() -> None:
    params = load_params()
    ids = pa.list_(pa.int32())
    pairs = read_parquet(PAIRS, {"prompt_id": pa.string(), "prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                                 "chosen_reward": pa.float64(), "rejected_reward": pa.float64()})
    ref = read_parquet(REF, {"prompt_id": pa.string(), "chosen_logprob": pa.float64(), "rejected_logprob": pa.float64()})
    temperature = params.logprob_temperature()
    fingerprint = inputs_fingerprint([Path(PAIRS), Path(REF), Path(MODEL) / "model.safetensors"],
                                     params.train, params.seed, temperature)
    main_process = is_main_process()
    live = None
    if params.train.mlflow_live and main_process:  # before training: an unreachable server fails here
        from rlhf_pipeline.tracking import LiveRun

        live = LiveRun({"seed": params.seed, "train": params.train.model_dump(exclude={"logprob_batch_size"})})
    try:
        with output_group():  # the policy, its log and its metrics appear together
            rows, summary = train_policy(MODEL, pairs, ref, params.train, params.seed, OUT, CHECKPOINTS, fingerprint,
                                         on_update=live.log_update if live else None, temperature=temperature)
            if main_process:
                write_tsv(rows, TRAIN_LOG_COLUMNS, LOG)
                write_json({**summary, "temperature": temperature, "peak_rss_mb": peak_rss_mb()}, METRICS)
    except BaseException:
        if live:
            live.finish(ok=False)
        raise
    if live:
        live.finish()


if __name__ == "__main__":
    run_stage(main)
