"""pairs: generations + scores + tokenizer -> ``data/pairs.parquet`` (chosen/rejected token ids)."""

import pyarrow as pa

from rlhf_pipeline.cli import run_stage
from rlhf_pipeline.models import load_tokenizer
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.pairs import build_pairs, join_scores
from rlhf_pipeline.params import load_params

MODEL = "models/base"
PROMPTS = "data/prompts/train.parquet"
GENERATIONS = "data/generations.parquet"
SCORES = "data/scores.parquet"
OUT = "data/pairs.parquet"
METRICS = "metrics/pairs.json"


def main() -> None:
    params = load_params()
    prompts = read_parquet(PROMPTS, {"prompt_id": pa.string(), "prompt": pa.string()})
    gens = read_parquet(GENERATIONS, {"prompt_id": pa.string(), "response_idx": pa.int32(), "response": pa.string(),
                                      "token_ids": pa.list_(pa.int32()), "finish_reason": pa.string()})
    scores = read_parquet(SCORES, {"prompt_id": pa.string(), "response_idx": pa.int32(), "reward": pa.float64()})
    responses = join_scores(gens, scores, GENERATIONS, SCORES)
    texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    table, counts = build_pairs(responses, texts, load_tokenizer(MODEL), params.pairs)
    with output_group():
        write_parquet(table, OUT)
        write_json(counts, METRICS)


if __name__ == "__main__":
    run_stage(main)
