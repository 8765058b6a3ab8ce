"""benchmark_base: the base policy π0 on the standard IFEval benchmark (every prompt, greedy,
``benchmark.max_new_tokens``), scored by IFEval's checkers -> its responses and the four accuracies.

A stage of its own, so every recipe compared on the benchmark reuses it.
"""

from rlhf_pipeline.benchmark import SCORER, benchmark_prompts, scores
from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.evaluation import policy_summary, sample_and_score
from rlhf_pipeline.outputs import output_group, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", "out", "metrics")
    params = load_params()
    prompts = benchmark_prompts(params.benchmark.num_prompts, params.seed)
    sampling = params.benchmark.sampling(params.generate)
    scorers = Scorers(SCORER)
    table, facts = sample_and_score(args.policy, prompts, sampling, scorers, params.seed, "the IFEval benchmark")
    summary = policy_summary(table, scorers)
    metrics = {"prompts": prompts.num_rows, "max_new_tokens": sampling.max_new_tokens, "dtype": sampling.dtype,
               **scores(table), "truncated_share": summary["truncated_share"],
               "mean_response_tokens": summary["mean_response_tokens"], **facts, "peak_rss_mb": peak_rss_mb()}
    with output_group():
        write_parquet(table, args.out)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
