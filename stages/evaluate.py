"""evaluate: iteration t's policy against the base policy on the validation prompts (paired, same
seeds) -> its comparison table and metrics (reward difference, win rate, IFEval accuracies, KL).

Validation only: tuning and the choice of the number of iterations read these; the test prompts
are evaluated once per pipeline execution, by ``evaluate_test``.
"""

import pyarrow.compute as pc

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.evaluation import compare_with_base
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.schemas import PROMPTS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", "base", "base-responses", "prompts", "out", "metrics")
    params = load_params()
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    base = read_parquet(args.base_responses, {"split": None})
    base = base.filter(pc.equal(base.column("split"), "val"))
    table, metrics = compare_with_base(base, args.base, args.policy, prompts, params.generate, Scorers(params.reward),
                                       params.evaluate, params.seed, args.prompts)
    with output_group():
        write_parquet(table, args.out)
        write_json({"split": "val", "policy": args.policy, **metrics, "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
