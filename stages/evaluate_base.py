"""evaluate_base: the base policy π0's responses to the validation and test prompts, scored.

A stage of its own, so that experiments which change only training reuse it; every policy is
compared with these responses (same prompts, same per-response seeds).
"""

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.evaluation import policy_summary, sample_and_score
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.schemas import PROMPTS, columns

SPLITS = ("val", "test")


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", *SPLITS, "out", "metrics")
    params = load_params()
    sampling = params.evaluate.sampling(params.generate)
    scorers = Scorers(params.reward)  # a reward model is loaded once, for both splits
    tables, metrics = [], {}
    for split in SPLITS:
        path = getattr(args, split)
        table, facts = sample_and_score(args.policy, read_parquet(path, columns(PROMPTS)), sampling, scorers,
                                        params.seed, path)
        tables.append(table.append_column("split", pa.array([split] * table.num_rows, pa.string())))
        metrics[split] = {"prompts": len(set(table.column("prompt_id").to_pylist())),
                          **policy_summary(table, scorers), **facts}
    with output_group():
        write_parquet(pa.concat_tables(tables), args.out)
        write_json({**metrics, "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
