"""prepare_model: ``policy.model`` -> the base policy folder π0 (safetensors, tokenizer, chat template)."""

import time

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.models import prepare_base_model
from rlhf_pipeline.outputs import output_group, write_json
from rlhf_pipeline.params import load_params


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "out", "metrics")
    params = load_params()
    t0 = time.perf_counter()
    with output_group():
        facts = prepare_base_model(params.policy.model, args.out, params.policy.revision,
                                   params.policy.trust_remote_code)
        write_json({**facts, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": peak_rss_mb()},
                   args.metrics)


if __name__ == "__main__":
    run_stage(main)
