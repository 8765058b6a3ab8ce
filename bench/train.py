"""Training speed: this project's DPO and REBEL against TRL's DPOTrainer, same pairs and settings.

All three start from the same prepared model, train on the same pairs (``data/iter_1/pairs.parquet``
and the prompt texts of ``data/prompts/train.parquet``, so run it after ``make repro``), with the
same batch size, steps and dtype, and include computing the reference log-probs once (TRL: ``precompute_ref_log_probs=True``;
here: the ``ref_logprobs`` code). Throughput counts the same tokens for all three: per pair,
prompt + chosen and prompt + rejected, for every episode trained.

    pip install -c envs/cpu-constraints.txt -e '.[bench]'   # TRL 1.x, benchmark-only extra
    python bench/train.py [--pairs 16] [--batch-size 4] [--steps 4]

Prints tokens/s of each, the ratios (goal >= 1.5x TRL) and each one's fraction of the CPU's fp32
compute limit (a matmul measured in the same run): 2 x parameters FLOP per reference-pass token
plus 6 x parameters FLOP per trained token (forward and backward).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rlhf_pipeline.process import configure_process

configure_process()  # as a stage's process is: before torch loads OpenMP

import torch

from rlhf_pipeline.chat import chat_messages
from rlhf_pipeline.logprobs import pair_logprobs
from rlhf_pipeline.models import load_policy, load_tokenizer, prepare_base_model
from rlhf_pipeline.objectives import PairwiseTask, make_objective
from rlhf_pipeline.params import TrainParams
from rlhf_pipeline.training import train_policy

from compute_limit import matmul_gflops  # bench/ is on sys.path when run as a script


def ours(model_dir, pairs, loss, args, scratch) -> float:
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    model = load_policy(model_dir, torch.float32)
    cols = [pairs.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    c, r = pair_logprobs(model, *cols, tok.pad_token_id, 1.0, args.batch_size * 2, progress=False)
    del model
    ref = pa.table({"prompt_id": pairs.column("prompt_id"), "chosen_logprob": c, "rejected_logprob": r})
    objective = {"name": loss, "beta": 0.1} if loss == "dpo" else {"name": loss}
    cfg = TrainParams(objective=objective, temperature=1.0, learning_rate=1e-6, per_device_train_batch_size=args.batch_size,
                      total_episodes=args.steps * args.batch_size, warmup_ratio=0.0, save_every=10**6, dtype="float32")
    task = PairwiseTask(pairs, ref, make_objective(cfg.objective), tok.pad_token_id, 1.0, "bench pairs")
    train_policy(model_dir, task, cfg, 0, scratch / f"policy-{loss}", scratch / f"ckpt-{loss}", "bench",
                 progress=False)
    return time.perf_counter() - t0


def trl_dpo(model_dir, pairs, prompt_text, args, scratch) -> float:
    """TRL tokenizes conversational data itself, with the same chat template."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(model_dir)
    data = Dataset.from_list([{
        "prompt": chat_messages(prompt_text[r["prompt_id"]]),
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs.to_pylist()])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = DPOConfig(output_dir=str(scratch / "trl"), per_device_train_batch_size=args.batch_size,
                    max_steps=args.steps, learning_rate=1e-6, beta=0.1, loss_type="sigmoid",
                    precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size * 2,
                    max_length=4096, logging_steps=10**6, save_strategy="no", report_to="none",
                    use_cpu=not torch.cuda.is_available(), bf16=False, dataloader_num_workers=0, seed=0)
    DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok).train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base")
    ap.add_argument("--pairs-file", default="data/iter_1/pairs.parquet")
    ap.add_argument("--prompts-file", default="data/prompts/train.parquet")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp())
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = scratch / "base"
        prepare_base_model("smollm2-135m-instruct", model_dir)
    pairs = pq.read_table(args.pairs_file).slice(0, args.pairs)
    prompts = pq.read_table(args.prompts_file)
    prompt_text = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
        *(pairs.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
    trained = tokens * args.steps * args.batch_size / pairs.num_rows  # tokens per episode x episodes
    total = tokens + trained  # reference pass over all pairs + training
    params = sum(p.numel() for p in load_policy(model_dir, torch.float32).parameters())
    flop = 2 * params * tokens + 6 * params * trained
    gflops = matmul_gflops(torch.float32)
    print(f"{pairs.num_rows} pairs, batch {args.batch_size}, {args.steps} steps, float32, "
          f"threads={torch.get_num_threads()}, {total:.0f} tokens (reference + training)")
    print(f"compute limit   : {gflops:.1f} GFLOP/s matmul; this work is {flop / 1e12:.2f} TFLOP "
          f"(2 x {params / 1e6:.1f} M x reference tokens + 6 x {params / 1e6:.1f} M x trained tokens)")
    results = {}
    for name, fn in [("trl DPOTrainer", lambda: trl_dpo(model_dir, pairs, prompt_text, args, scratch)),
                     ("ours dpo", lambda: ours(model_dir, pairs, "dpo", args, scratch)),
                     ("ours rebel", lambda: ours(model_dir, pairs, "rebel", args, scratch))]:
        seconds = fn()
        results[name] = total / seconds
        print(f"{name:16s}: {seconds:7.1f} s {results[name]:7.1f} tok/s, "
              f"{flop / seconds / (gflops * 1e9):.2f} of the compute limit")
    for name in ("ours dpo", "ours rebel"):
        print(f"ratio {name} / trl: {results[name] / results['trl DPOTrainer']:.2f}")


if __name__ == "__main__":
    main()
