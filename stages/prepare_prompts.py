"""prepare_prompts: ``data.*`` -> ``data/prompts/{train,test}.parquet`` (seeded draw and split)."""

from rlhf_pipeline.cli import run_stage
from rlhf_pipeline.data import load_source, split_prompts
from rlhf_pipeline.outputs import write_json, write_parquet
from rlhf_pipeline.params import load_params

TRAIN = "data/prompts/train.parquet"
TEST = "data/prompts/test.parquet"
METRICS = "metrics/prepare_prompts.json"


def main() -> None:
    params = load_params()
    split = split_prompts(load_source(params.data), params.data.num_prompts, params.data.test_size, params.seed)
    write_parquet(split.train, TRAIN)
    write_parquet(split.test, TEST)
    write_json({"source": params.data.source, **split.counts}, METRICS)


if __name__ == "__main__":
    run_stage(main)
