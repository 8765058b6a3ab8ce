"""online_evaluate: an online policy against the base policy on the validation and the test prompts
(paired, same seeds: the protocol of ``evaluate`` and ``evaluate_test``) -> its comparison table
(a ``split`` column) and metrics ``{"val": …, "test": …}``.

Choose between algorithms and settings on ``val``; ``test`` is there to be reported once, for the
choice made.
"""

import pyarrow as pa
import pyarrow.compute as pc

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.evaluation import compare_with_base
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.schemas import PROMPTS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", "base", "base-responses", "val", "test", "out", "metrics")
    params = load_params()
    base = read_parquet(args.base_responses, {"split": None})
    scorers = Scorers(params.reward)
    tables, metrics = [], {"policy": args.policy}
    for split, path in (("val", args.val), ("test", args.test)):
        prompts = read_parquet(path, columns(PROMPTS))
        table, metrics[split] = compare_with_base(base.filter(pc.equal(base.column("split"), split)), args.base,
                                                  args.policy, prompts, params.generate, scorers, params.evaluate,
                                                  params.seed, path)
        tables.append(table.append_column("split", pa.array([split] * table.num_rows, pa.string())))
    with output_group():
        write_parquet(pa.concat_tables(tables), args.out)
        write_json({**metrics, "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
