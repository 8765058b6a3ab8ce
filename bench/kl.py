"""Where the evaluation's KL estimate spends its time: the two models' forward passes, or the
full-vocabulary arithmetic on their logits.

``evaluate@iter_t`` and ``evaluate_test`` compute KL(πθ‖π0) along each trained response
(:func:`rlhf_pipeline.logprobs.response_kl`): a forward pass of the policy and one of the base over
(prompt, response), then log-softmax, exp and a sum over the 49 152-token vocabulary at every
response position. This script times the whole call, then the two forward passes alone on the same
batches, and prints their share of the whole; the rest is the vocabulary arithmetic (and batching).

The evaluation table keeps response text, not token ids, so the responses are re-tokenized (with
the end-of-turn token appended); re-encoding can merge tokens differently from sampling, so the
lengths are close to, not exactly, the stage's. Timing only: nothing here is compared by value.

Run after ``make repro`` (it reads that run's models and evaluation table), nothing else running:
    python bench/kl.py --table data/eval/iter_1.parquet --policy models/iter_1 --base models/base
"""
from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
import torch

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.logprobs import _response_logits, length_grouped_batches, response_kl
from rlhf_pipeline.models import load_policy, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default="data/eval/iter_1.parquet", help="an evaluation table (prompt, trained_response)")
    ap.add_argument("--policy", default="models/iter_1")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (evaluate.logprob_batch_size)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="logits / temperature (the stages use 1.0 for greedy evaluation)")
    args = ap.parse_args()

    rows = pq.read_table(args.table, columns=["prompt", "trained_response"]).to_pylist()
    tok = load_tokenizer(args.policy)
    prompts = [prompt_token_ids(tok, r["prompt"]) for r in rows]
    responses = [tok.encode(r["trained_response"], add_special_tokens=False) + [tok.eos_token_id] for r in rows]
    cpu = torch.device("cpu")
    policy, base = (load_policy(d, torch.float32, cpu) for d in (args.policy, args.base))
    print(f"{len(rows)} rows: {sum(map(len, prompts))} prompt tokens, {sum(map(len, responses))} response tokens; "
          f"threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    response_kl(policy, base, prompts, responses, tok.pad_token_id, args.temperature, args.batch_size, progress=False)
    whole = time.perf_counter() - t0

    forward = 0.0
    with torch.no_grad():
        for idx in length_grouped_batches([len(p) + len(r) for p, r in zip(prompts, responses)], args.batch_size):
            batch = ([prompts[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id, args.temperature)
            t0 = time.perf_counter()
            _response_logits(policy, *batch)
            _response_logits(base, *batch)
            forward += time.perf_counter() - t0
    print(f"response_kl: {whole:.1f} s; its forward passes alone {forward:.1f} s ({forward / whole:.2f}), "
          f"the rest (vocabulary arithmetic) {whole - forward:.1f} s ({(whole - forward) / whole:.2f})")


if __name__ == "__main__":
    main()
