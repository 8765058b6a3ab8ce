"""score: generations + train prompts -> ``data/scores.parquet`` (a reward per response)."""

import time

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import penalize_missing_eos, reward_summary, score_responses

GENERATIONS = "data/generations.parquet"
PROMPTS = "data/prompts/train.parquet"
OUT = "data/scores.parquet"
METRICS = "metrics/score.json"


def main() -> None:
    params = load_params()
    prompts = read_parquet(PROMPTS, {"prompt_id": pa.string(), "prompt": pa.string()})
    gens = read_parquet(GENERATIONS, {"prompt_id": pa.string(), "response_idx": pa.int32(), "response": pa.string(),
                                      "finish_reason": pa.string()})
    rows = sorted(zip(*(gens.column(c).to_pylist() for c in ("prompt_id", "response_idx", "response", "finish_reason"))))
    t0 = time.perf_counter()
    table, facts = score_responses([r[:3] for r in rows], prompts, params.reward, where=PROMPTS)
    table = penalize_missing_eos(table, [r[3] for r in rows], params.reward.missing_eos_penalty)
    seconds = time.perf_counter() - t0
    metrics = {**reward_summary(table), **facts, "seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb()}
    with output_group():
        write_parquet(table, OUT)
        write_json(metrics, METRICS)


if __name__ == "__main__":
    run_stage(main)
