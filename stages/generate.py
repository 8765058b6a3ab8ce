"""generate: base policy + train prompts -> ``data/generations.parquet`` (N responses per prompt)."""

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage
from rlhf_pipeline.generation import run_generation
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params

MODEL = "models/base"
PROMPTS = "data/prompts/train.parquet"
OUT = "data/generations.parquet"
METRICS = "metrics/generate.json"


def main() -> None:
    params = load_params()
    prompts = read_parquet(PROMPTS, {"prompt_id": pa.string(), "prompt": pa.string()})
    pairs = list(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    table, metrics = run_generation(MODEL, pairs, params.generate, params.seed)
    with output_group():
        write_parquet(table, OUT)
        write_json({**metrics, "peak_rss_mb": peak_rss_mb()}, METRICS)


if __name__ == "__main__":
    run_stage(main)
