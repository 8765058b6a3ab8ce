"""score: generations + their prompts -> scores (a reward per response).

With ``--reward-model DIR`` (the classic variant's RL step) the reward is that learned reward
model's score alone; the configured scorers are kept at weight 0 and the metrics report how well
the reward model agrees with them on these responses (``rlhf_pipeline.learned_reward``).
"""

import time
from pathlib import Path

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers, penalize_missing_eos, reward_summary, score_responses
from rlhf_pipeline.learned_reward import agreement_metrics, learned_reward_params
from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "generations", "prompts", "out", "metrics", reward_model="")
    params = load_params()
    if args.reward_model and not Path(args.reward_model).is_dir():
        raise PipelineError(f"--reward-model {args.reward_model}: not a model folder (the reward_model stage's output)")
    reward = learned_reward_params(params.reward, args.reward_model) if args.reward_model else params.reward
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    gens = read_parquet(args.generations, columns(GENERATIONS, "prompt_id", "response_idx", "response",
                                                  "finish_reason"))
    rows = sorted(zip(*(gens.column(c).to_pylist() for c in ("prompt_id", "response_idx", "response", "finish_reason"))))
    t0 = time.perf_counter()
    scorers = Scorers(reward)
    table, facts = score_responses([r[:3] for r in rows], prompts, scorers, where=args.prompts)
    table = penalize_missing_eos(table, [r[3] for r in rows], reward.missing_eos_penalty)
    seconds = time.perf_counter() - t0
    metrics = {**reward_summary(table, scorers), **facts, "seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb()}
    if args.reward_model:
        metrics.update({"reward_model": args.reward_model, **agreement_metrics(table, reward)})
    with output_group():
        write_parquet(table, args.out)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
