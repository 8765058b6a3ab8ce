"""train: base policy + pairs + reference log-probs -> ``models/policy/`` (REBEL by default).

Run as one process on CPU (``dvc repro``), or on GPUs with
``accelerate launch --config_file envs/accelerate/deepspeed_zero3.yaml -m stages.train``.
"""

from pathlib import Path

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage
from rlhf_pipeline.outputs import atomic_file, read_parquet, write_json
from rlhf_pipeline.params import load_params
from rlhf_pipeline.training import TRAIN_LOG_COLUMNS, inputs_fingerprint, train_policy

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
    fingerprint = inputs_fingerprint([Path(PAIRS), Path(REF), Path(MODEL) / "model.safetensors"],
                                     params.train, params.seed)
    rows, summary = train_policy(MODEL, pairs, ref, params.train, params.seed, OUT, CHECKPOINTS, fingerprint)
    with atomic_file(LOG) as tmp:
        lines = ["\t".join(TRAIN_LOG_COLUMNS)]
        lines += ["\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in TRAIN_LOG_COLUMNS)
                  for r in rows]
        tmp.write_text("\n".join(lines) + "\n")
    write_json({**summary, "peak_rss_mb": peak_rss_mb()}, METRICS)


if __name__ == "__main__":
    run_stage(main)
