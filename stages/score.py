"""score: generations + their prompts -> scores (a reward per response)."""

import time

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers, penalize_missing_eos, reward_summary, score_responses
from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "generations", "prompts", "out", "metrics")
    params = load_params()
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    gens = read_parquet(args.generations, columns(GENERATIONS, "prompt_id", "response_idx", "response",
                                                  "finish_reason"))
    rows = sorted(zip(*(gens.column(c).to_pylist() for c in ("prompt_id", "response_idx", "response", "finish_reason"))))
    t0 = time.perf_counter()
    scorers = Scorers(params.reward)
    table, facts = score_responses([r[:3] for r in rows], prompts, scorers, where=args.prompts)
    table = penalize_missing_eos(table, [r[3] for r in rows], params.reward.missing_eos_penalty)
    seconds = time.perf_counter() - t0
    metrics = {**reward_summary(table, scorers), **facts, "seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb()}
    with output_group():
        write_parquet(table, args.out)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
