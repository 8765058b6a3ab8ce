"""train: policy π_t + pairs + reference log-probs -> π_{t+1} (REBEL by default; ``train.objective``).

Run as one process on CPU (``dvc repro``), or on several with ``accelerate launch [--config_file
envs/accelerate/deepspeed_zero3.yaml] -m stages.train --policy … --out …``: only the main process
writes the policy and the metrics. Resumable state of an interrupted run lives beside the output,
in ``<out's folder>/.checkpoints/<out's name>`` (one per output: iterations never share one), and
is removed when the stage completes.
"""

from pathlib import Path

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.iterations import iteration_number, iteration_seed
from rlhf_pipeline.lora import check_quantization
from rlhf_pipeline.models import load_tokenizer
from rlhf_pipeline.objectives import PairwiseTask, make_objective
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_tsv
from rlhf_pipeline.params import load_params
from rlhf_pipeline.schemas import PAIRS, REF_LOGPROBS, columns
from rlhf_pipeline.tracking import live_run
from rlhf_pipeline.training import inputs_fingerprint, is_main_process, train_log_columns, train_policy


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "iteration", "policy", "pairs", "ref-logprobs", "out", "metrics", "log")
    params = load_params()
    check_quantization(params.train.lora, "train")
    seed = iteration_seed(params.seed, iteration_number(args.iteration))
    pairs = read_parquet(args.pairs, columns(PAIRS, "prompt_id", "prompt_ids", "chosen_ids", "rejected_ids",
                                             "chosen_reward", "rejected_reward"))
    ref = read_parquet(args.ref_logprobs, columns(REF_LOGPROBS))
    temperature = params.logprob_temperature()
    task = PairwiseTask(pairs, ref, make_objective(params.train.objective), load_tokenizer(args.policy).pad_token_id,
                        temperature, f"{args.pairs} and {args.ref_logprobs}")
    out = Path(args.out)
    inputs = [Path(args.pairs), Path(args.ref_logprobs), Path(args.policy) / "model.safetensors"]
    fingerprint = inputs_fingerprint(inputs, params.train, seed, temperature)
    main_process = is_main_process()
    train_keys = params.train.model_dump(exclude={"logprob_batch_size", "reference", "allow_temperature_mismatch"})
    # Opened before training: an unreachable tracking server fails here, not after the work.
    with live_run(params.train.mlflow_live and main_process,
                  {"seed": params.seed, "iteration": args.iteration, "train": train_keys}, "train") as live:
        with output_group():  # the policy, its log and its metrics appear together
            rows, summary = train_policy(args.policy, task, params.train, seed, out,
                                         out.parent / ".checkpoints" / out.name, fingerprint,
                                         on_update=live.log_update if live else None, where=args.pairs)
            if main_process:
                write_tsv(rows, train_log_columns(task), args.log)
                write_json({"iteration": args.iteration, **summary, "temperature": temperature,
                            "peak_rss_mb": peak_rss_mb()}, args.metrics)


if __name__ == "__main__":
    run_stage(main)
