"""benchmark: the last iteration's policy against the base policy on the standard IFEval benchmark
(every prompt, greedy, the same settings as ``benchmark_base``) -> the comparison table and
``metrics/benchmark/final.json``: the four accuracies and the card's average of both policies, their
paired differences with bootstrap intervals over prompts, response lengths and truncated shares.
KL to the base is the evaluation stages' (validation and test splits): on 541 responses of up to
``benchmark.max_new_tokens`` its two forward passes would cost as much as the sampling.

``--models`` is the folder holding ``base`` and ``iter_<t>``: the last item of ``iterations`` is
read from params, since dvc.yaml cannot name it.
"""

from pathlib import Path

from rlhf_pipeline.benchmark import SCORER, benchmark_prompts, paired_differences, side_of
from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.evaluation import compare_with_base
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import Scorers


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "models", "base-responses", "out", "metrics")
    params = load_params()
    cfg = params.benchmark
    last = list(params.iterations)[-1]
    prompts = benchmark_prompts(cfg.num_prompts, params.seed)
    base = read_parquet(args.base_responses)
    models = Path(args.models)
    table, comparison = compare_with_base(base, models / "base", models / last, prompts, params.generate,
                                          Scorers(SCORER), cfg, params.seed, "the IFEval benchmark", with_kl=False)
    ifeval = paired_differences(side_of(table, "base"), side_of(table, "trained"), cfg.bootstrap_samples,
                                cfg.confidence, params.seed)
    lengths = {policy: {k: comparison[policy][k] for k in ("mean_response_tokens", "truncated_share")}
               for policy in ("base", "trained")}
    metrics = {"policy": last, "prompts": prompts.num_rows, "max_new_tokens": cfg.max_new_tokens,
               "confidence": cfg.confidence, "bootstrap_samples": cfg.bootstrap_samples, "ifeval": ifeval,
               **lengths, "reward": comparison["reward"],
               "win_rate": comparison["win_rate"], "peak_rss_mb": peak_rss_mb()}
    with output_group():
        write_parquet(table, args.out)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
