"""evaluate_base: the base policy π0's responses to the validation and test prompts, scored.

A stage of its own, so that experiments which change only training reuse it; every policy is
compared with these responses (same prompts, same per-response seeds).

Both splits are sampled in one pass: a decode step of a small batch costs about what a larger one
does on a CPU (the weights are read once per step): 16 + 24 greedy responses took 106 s together
against 54 + 65 s one split after the other, the same responses (docs/results.md, "The small default").
"""

import pyarrow as pa
import pyarrow.compute as pc

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.errors import PipelineError
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
    scorers = Scorers(params.reward)
    prompts = {split: read_parquet(getattr(args, split), columns(PROMPTS)) for split in SPLITS}
    ids = {split: set(table.column("prompt_id").to_pylist()) for split, table in prompts.items()}
    if shared := ids["val"] & ids["test"]:
        raise PipelineError(f"{args.val} and {args.test} both hold {len(shared)} prompt id(s), e.g. "
                            f"{min(shared)}: rerun prepare_prompts")
    table, facts = sample_and_score(args.policy, pa.concat_tables(prompts.values()), sampling, scorers,
                                    params.seed, f"{args.val} + {args.test}")
    tables, metrics = [], {}
    for split in SPLITS:
        part = table.filter(pc.is_in(table.column("prompt_id"), pa.array(sorted(ids[split]), pa.string())))
        tables.append(part.append_column("split", pa.array([split] * part.num_rows, pa.string())))
        metrics[split] = {"prompts": len(ids[split]), **policy_summary(part, scorers)}
    with output_group():
        write_parquet(pa.concat_tables(tables), args.out)
        write_json({**metrics, **facts, "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
