"""generate: policy π_t + iteration t's chunk of the train prompts -> generations (N responses per prompt)."""

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.generation import run_generation
from rlhf_pipeline.iterations import iteration_number, iteration_prompts, iteration_seed
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.schemas import PROMPTS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "iteration", "policy", "prompts", "out", "metrics")
    params = load_params()
    t = iteration_number(args.iteration)
    seed = iteration_seed(params.seed, t)
    prompts = iteration_prompts(read_parquet(args.prompts, columns(PROMPTS)), t, params.data.prompts_per_iteration,
                                params.data.reuse_prompts, params.seed, args.prompts)
    pairs = list(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    table, metrics = run_generation(args.policy, pairs, params.generate, seed)
    with output_group():
        write_parquet(table, args.out)
        write_json({"iteration": t, "seed": seed, **metrics, "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
