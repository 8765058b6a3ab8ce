"""prepare_prompts: ``data.*`` + the base policy's tokenizer and context -> ``data/prompts/{train,test}.parquet``
(prompts too long for the model dropped, then a seeded draw and split)."""

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.cli import run_stage
from rlhf_pipeline.data import drop_long_prompts, load_source, prompt_token_limit, split_prompts
from rlhf_pipeline.models import load_tokenizer, model_context
from rlhf_pipeline.outputs import output_group, write_json, write_parquet
from rlhf_pipeline.params import PROMPT_SOURCES_DIR, load_params

MODEL = "models/base"
TRAIN = "data/prompts/train.parquet"
TEST = "data/prompts/test.parquet"
METRICS = "metrics/prepare_prompts.json"


def main() -> None:
    params = load_params()
    source = load_source(params.data, PROMPT_SOURCES_DIR)
    tokenizer = load_tokenizer(MODEL)
    budgets = [params.generate.max_new_tokens, params.evaluate.max_new_tokens or params.generate.max_new_tokens]
    limit = prompt_token_limit(model_context(MODEL), budgets, params.pairs.max_prompt_tokens)
    kept, dropped = drop_long_prompts(source, [len(prompt_token_ids(tokenizer, p)) for p in source.prompts], limit)
    split = split_prompts(kept, params.data.num_prompts, params.data.test_size, params.seed)
    metrics = {"source": params.data.source, **source.facts, "max_prompt_tokens": limit,
               "dropped_prompt_too_long": dropped, **split.counts}
    with output_group():  # both splits change together, or neither does
        write_parquet(split.train, TRAIN)
        write_parquet(split.test, TEST)
        write_json(metrics, METRICS)


if __name__ == "__main__":
    run_stage(main)
