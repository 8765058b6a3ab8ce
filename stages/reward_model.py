"""reward_model: policy + preference pairs -> a Bradley–Terry reward model (classic variant,
``classic/dvc.yaml``).

The policy (the SFT policy there, as InstructGPT's RM) with a linear head on the last token
(``AutoModelForSequenceClassification``, one output) trained on the one loop with
−log σ(r(x, y) − r(x, y') − m) (Ouyang et al. 2022, Eq. 1). Pairs (``reward_model.source``): every
pair of a prompt's scored responses whose rewards differ (``--generations``/``--scores``, the
default DAG's iteration 1), or a file under ``--sources`` or a dataset in the prompt/chosen/rejected
format. Every pair of ``reward_model.val_size`` prompts is held out: the metrics report their pairwise
accuracy with a 95 % interval, loss, mean gap and calibration, before training (the untrained head)
and after.
The output folder is what the ``sequence-classification`` scorer loads.
"""

import gc
from pathlib import Path

import torch

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.lora import check_quantization
from rlhf_pipeline.models import default_device, load_tokenizer
from rlhf_pipeline.objectives import RewardModelTask, load_reward_model_for_training
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.preferences import from_generations, load_source, split_preferences
from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, SCORES, columns
from rlhf_pipeline.training import inputs_fingerprint, is_main_process, train_and_write


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", "prompts", "generations", "scores", "sources", "out", "metrics", "log")
    params = load_params()
    cfg = params.reward_model
    check_quantization(cfg.lora, "reward_model")
    tok = load_tokenizer(args.policy)
    if cfg.source == "generations":
        prompts = read_parquet(args.prompts, columns(PROMPTS))
        prefs, facts = from_generations(
            dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist())),
            read_parquet(args.generations, columns(GENERATIONS, "prompt_id", "response_idx", "response")),
            read_parquet(args.scores, columns(SCORES)), cfg.min_reward_gap)
        where = f"{args.generations} and {args.scores}"
    else:
        prefs, facts = load_source(cfg, args.sources)
        where = f"reward_model.source {cfg.source} ({cfg.path or cfg.dataset})"
    split = split_preferences(tok, prefs, cfg, params.seed)
    train = RewardModelTask(*split.train, tok.pad_token_id, cfg.center_rewards_coefficient, f"{where}, training pairs")
    val = RewardModelTask(*split.val, tok.pad_token_id, cfg.center_rewards_coefficient, f"{where}, held-out pairs")
    out = Path(args.out)
    fingerprint = inputs_fingerprint([Path(args.policy) / "model.safetensors"], cfg, params.seed, 1.0,
                                     data=split.digest())
    main_process = is_main_process()
    batch = cfg.per_device_eval_batch_size

    def heldout(model) -> dict:
        return val.heldout_metrics(model, batch, cfg.bootstrap_samples, cfg.calibration_bins, params.seed)

    before = None
    if main_process:  # the policy with the head the training run starts from (same seed)
        torch.manual_seed(params.seed)
        before = heldout(load_reward_model_for_training(args.policy, torch.float32, default_device(),
                                                        tok.pad_token_id).eval())
        gc.collect()
    train_and_write(args.policy, train, cfg, params.seed, out, fingerprint, log_path=args.log, metrics_path=args.metrics,
                    metrics=lambda summary: {**split.counts, **facts, **summary, "val_before": before},
                    live_params={"seed": params.seed, "reward_model": cfg.model_dump()}, live_name="reward_model",
                    where=where, evaluate=lambda model: {"val_after": heldout(model)})


if __name__ == "__main__":
    run_stage(main)
