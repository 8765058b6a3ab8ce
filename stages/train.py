"""train: policy π_t + pairs + reference log-probs -> π_{t+1} (REBEL by default; ``train.objective``).

Run as one process on CPU (``dvc repro``), or on several with ``accelerate launch [--config_file
envs/accelerate/deepspeed_zero3.yaml] -m stages.train --policy … --out …``: only the main process
writes the policy and the metrics. Resumable state of an interrupted run lives beside the output,
in ``<out's folder>/.checkpoints/<out's name>`` (one per output: iterations never share one), and
is removed when the stage completes.
"""

from pathlib import Path

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.iterations import iteration_number, iteration_seed
from rlhf_pipeline.lora import check_quantization
from rlhf_pipeline.models import load_tokenizer
from rlhf_pipeline.objectives import PairwiseTask, make_objective
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.params import check_plugins, load_params
from rlhf_pipeline.schemas import PAIRS, REF_LOGPROBS, columns
from rlhf_pipeline.training import inputs_fingerprint, train_and_write


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "iteration", "policy", "pairs", "ref-logprobs", "out", "metrics", "log")
    params = load_params()
    check_plugins(params)  # the objective's keys, by its own Params
    check_quantization(params.train.lora, "train")
    seed = iteration_seed(params.seed, iteration_number(args.iteration))
    pairs = read_parquet(args.pairs, columns(PAIRS, "prompt_id", "prompt_ids", "chosen_ids", "rejected_ids",
                                             "chosen_reward", "rejected_reward"))
    ref = read_parquet(args.ref_logprobs, columns(REF_LOGPROBS))
    temperature = params.logprob_temperature()
    task = PairwiseTask(pairs, ref, make_objective(params.train.objective), load_tokenizer(args.policy).pad_token_id,
                        temperature, f"{args.pairs} and {args.ref_logprobs}")
    inputs = [Path(args.pairs), Path(args.ref_logprobs), Path(args.policy) / "model.safetensors"]
    fingerprint = inputs_fingerprint(inputs, params.train, seed, temperature)
    train_keys = params.train.model_dump(exclude={"logprob_batch_size", "reference", "allow_temperature_mismatch"})
    train_and_write(args.policy, task, params.train, seed, args.out, fingerprint, log_path=args.log,
                    metrics_path=args.metrics,
                    metrics=lambda summary: {"iteration": args.iteration, **summary, "temperature": temperature},
                    live_params={"seed": params.seed, "iteration": args.iteration, "train": train_keys},
                    live_name="train", where=args.pairs)


if __name__ == "__main__":
    run_stage(main)
