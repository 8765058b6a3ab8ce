"""evaluate: base and trained policy on the held-out test prompts -> ``data/eval.parquet``,
``metrics/eval.json`` and the reward histogram for ``dvc plots``."""

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage
from rlhf_pipeline.evaluation import evaluate_policies, reward_histogram
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet, write_tsv
from rlhf_pipeline.params import load_params

BASE = "models/base"
POLICY = "models/policy"
PROMPTS = "data/prompts/test.parquet"
OUT = "data/eval.parquet"
METRICS = "metrics/eval.json"
HISTOGRAM = "metrics/eval_reward_hist.tsv"


def main() -> None:
    params = load_params()
    prompts = read_parquet(PROMPTS, {"prompt_id": pa.string(), "prompt": pa.string()})
    table, metrics = evaluate_policies(BASE, POLICY, prompts, params.generate, params.reward, params.evaluate,
                                       params.seed)
    histogram = reward_histogram(table)
    with output_group():
        write_parquet(table, OUT)
        write_tsv(histogram, ("reward", "base", "trained"), HISTOGRAM)
        write_json({**metrics, "peak_rss_mb": peak_rss_mb()}, METRICS)


if __name__ == "__main__":
    run_stage(main)
