"""Log-prob precision: the REBEL log-ratio gap of identical weights, float32 against bf16 autocast.

The reference log-probs (``ref_logprobs``) and the policy's log-probs in ``train`` are computed in
different micro-batches. With the same weights for both, REBEL's predicted gap
((log πθ(y|x) − log π_t(y|x)) − (log πθ(y'|x) − log π_t(y'|x))) should be 0; this script computes
every pair's log-probs twice with the same model, in micro-batches of ``--batch-a`` and
``--batch-b`` sequences, and prints the gap's size in each dtype (nats), and the seconds taken.

    python bench/logprob_precision.py [--pairs-file data/iter_1/pairs.parquet]   # after make repro

bf16 runs only where the CPU computes it natively (AVX-512 BF16 or AMX; elsewhere it is emulated
and slow, and is skipped) or on CUDA.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
from rlhf_pipeline.process import configure_process

configure_process()  # as a stage's process is: before torch loads OpenMP

import torch

from rlhf_pipeline.logprobs import pair_logprobs
from rlhf_pipeline.models import cpu_has_native_bf16, default_device, load_policy, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base")
    ap.add_argument("--pairs-file", default="data/iter_1/pairs.parquet")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-a", type=int, default=8, help="sequences per forward pass (ref_logprobs' default)")
    ap.add_argument("--batch-b", type=int, default=2, help="sequences per forward pass (train's micro-batch)")
    args = ap.parse_args()
    pairs = pq.read_table(args.pairs_file)
    prompts, chosen, rejected = (pairs.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    device = default_device()
    model = load_policy(args.model_dir, torch.float32, device)
    pad = load_tokenizer(args.model_dir).pad_token_id
    dtypes = [("float32", None)]
    if device.type == "cuda" or cpu_has_native_bf16():
        dtypes.append(("bf16 autocast", torch.bfloat16))
    print(f"{pairs.num_rows} pairs of {args.pairs_file}, micro-batches of {args.batch_a} and {args.batch_b} "
          f"sequences, {device.type}, threads={torch.get_num_threads()}")
    for name, autocast in dtypes:
        t0 = time.perf_counter()
        a = pair_logprobs(model, prompts, chosen, rejected, pad, args.temperature, args.batch_a, autocast,
                          progress=False)
        b = pair_logprobs(model, prompts, chosen, rejected, pad, args.temperature, args.batch_b, autocast,
                          progress=False)
        seconds = time.perf_counter() - t0
        gap = torch.tensor([(ca - cb) - (ra - rb) for ca, cb, ra, rb in zip(a[0], b[0], a[1], b[1])]).abs()
        print(f"{name:14s}: log-ratio gap of identical weights mean {gap.mean():.3g}, max {gap.max():.3g} nats "
              f"per pair; {seconds:.1f} s for both passes")


if __name__ == "__main__":
    main()
