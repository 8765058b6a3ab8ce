"""prepare_prompts: ``data.*`` + the base policy's tokenizer and context -> train, validation and
test prompt files (prompts too long for the model dropped, then a seeded draw and split; every
iteration's chunk of train prompts checked to exist before any iteration runs)."""

from rlhf_pipeline.chat import control_token_in, prompt_token_ids
from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.data import drop_long_prompts, load_source, prompt_token_limit, split_prompts
from rlhf_pipeline.iterations import check_iterations_fit
from rlhf_pipeline.models import load_tokenizer, model_context
from rlhf_pipeline.outputs import output_group, write_json, write_parquet
from rlhf_pipeline.params import PROMPT_SOURCES_DIR, check_plugins, load_params


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "model", "train", "val", "test", "metrics")
    params = load_params()
    check_plugins(params, scorers=True)  # the objective's and scorers' keys: fail here, not minutes of sampling later
    source = load_source(params.data, PROMPT_SOURCES_DIR, params.seed)
    tokenizer = load_tokenizer(args.model)
    # a prompt holding a control token as text would forge chat turns (rlhf_pipeline.chat): dropped, counted
    clean = [i for i, p in enumerate(source.prompts) if control_token_in(tokenizer, p) is None]
    control_tokens = len(source.prompts) - len(clean)
    source = source.select(clean)
    budgets = [params.generate.max_new_tokens, params.evaluate.max_new_tokens or params.generate.max_new_tokens]
    limit = prompt_token_limit(model_context(args.model), budgets, params.pairs.max_prompt_tokens)
    kept, dropped = drop_long_prompts(source, [len(prompt_token_ids(tokenizer, p)) for p in source.prompts], limit)
    split = split_prompts(kept, params.data.num_prompts, params.data.test_size, params.data.val_size, params.seed)
    check_iterations_fit(split.train.num_rows, len(params.iterations), params.data.prompts_per_iteration,
                         params.data.reuse_prompts, "the train split")
    metrics = {"source": params.data.source, **source.facts, "max_prompt_tokens": limit,
               "dropped_prompt_too_long": dropped,
               "dropped_control_tokens": control_tokens, **split.counts}
    with output_group():  # the three splits change together, or none does
        write_parquet(split.train, args.train)
        write_parquet(split.val, args.val)
        write_parquet(split.test, args.test)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
