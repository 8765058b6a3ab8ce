"""Online rollouts: does vLLM with a weight sync per step pay against the stage's sampler? One run.

An online stage (``online_train``) samples the *current* policy at every rollout step: with the
stage's sampler (``generation.generate_transformers``) that is the model in memory; with vLLM it
is an engine started once, into which the policy's weights are synced after each update
(``generation.sync_vllm_weights``, TRL's colocate mode). This runs rollout-shaped work both ways,
in one process (the vLLM environment, ``make venv-vllm``): ``--steps`` steps of ``--prompts``
train prompts x ``--responses`` responses, each step after a stand-in update (every weight moved
by a seeded relative perturbation of ``--perturb``, so that the sync has new weights to carry and
both backends sample a changed policy). Per step: the sampler's seconds, the sync's, vLLM's
generation seconds, tokens/s of each; then the engine's start-up and the number of steps after
which vLLM's start-up is paid back (none when a synced vLLM step is slower than a sampler step).

    python bench/rollouts.py [--prompts 8] [--responses 4] [--steps 3] [--max-new-tokens 256]
                             [--dtype float32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlhf_pipeline.process import configure_process

configure_process()  # as a stage's process is: before torch loads OpenMP

import torch

from rlhf_pipeline.data import load_ifeval, split_prompts
from rlhf_pipeline.generation import generate_transformers, generate_vllm, sync_vllm_weights, vllm_engine
from rlhf_pipeline.models import load_policy, load_tokenizer
from rlhf_pipeline.params import GenerateParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base", help="a prepared policy folder (make repro writes it)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout step (online.prompts_per_step)")
    ap.add_argument("--responses", type=int, default=4, help="responses per prompt (online.num_responses)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", help="online training samples in float32")
    ap.add_argument("--perturb", type=float, default=0.01, help="relative size of the stand-in update")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    tok = load_tokenizer(model_dir)
    dtype = getattr(torch, args.dtype)
    policy = load_policy(model_dir, dtype)
    train = split_prompts(load_ifeval(), None, 48, 32, args.seed).train
    cfg = GenerateParams(num_responses=args.responses, max_new_tokens=args.max_new_tokens, temperature=0.8,
                         top_p=1.0, batch_size=64, dtype=args.dtype)
    print(f"{args.steps} steps x {args.prompts} prompts x {args.responses} responses, max_new_tokens="
          f"{args.max_new_tokens}, {args.dtype}, threads={torch.get_num_threads()}")
    t0 = time.perf_counter()
    llm = vllm_engine(model_dir, args.dtype, args.seed, gpu_memory_utilization=0.2, in_process=True)
    startup = time.perf_counter() - t0
    print(f"vLLM engine start-up (in process): {startup:.1f} s")
    gen = torch.Generator().manual_seed(args.seed)
    totals = {"sampler": 0.0, "vllm": 0.0}
    for step in range(args.steps):
        with torch.no_grad():  # a stand-in for the step's optimizer updates
            for p in policy.parameters():
                p.mul_(1 + args.perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        rows = train.slice(step * args.prompts, args.prompts)
        prompts = list(zip(rows.column("prompt_id").to_pylist(), rows.column("prompt").to_pylist()))
        t0 = time.perf_counter()
        ours = generate_transformers(policy, tok, prompts, cfg, args.seed + step, progress=False)
        sampler_s = time.perf_counter() - t0
        sync_s = sync_vllm_weights(llm, policy)
        t0 = time.perf_counter()
        theirs = generate_vllm(model_dir, tok, prompts, cfg, args.seed + step, args.dtype, llm=llm)
        vllm_s = time.perf_counter() - t0
        a, b = sum(r.num_tokens for r in ours), sum(r.num_tokens for r in theirs)
        totals["sampler"] += sampler_s
        totals["vllm"] += sync_s + vllm_s
        print(f"step {step + 1}: sampler {a:5d} tokens {sampler_s:6.1f} s {a / sampler_s:6.1f} tok/s | "
              f"sync {sync_s:5.2f} s + vLLM {b:5d} tokens {vllm_s:6.1f} s {b / vllm_s:6.1f} tok/s")
    per_step_gain = (totals["sampler"] - totals["vllm"]) / args.steps
    print(f"per step: sampler {totals['sampler'] / args.steps:.1f} s, vLLM with sync "
          f"{totals['vllm'] / args.steps:.1f} s (ratio {totals['sampler'] / totals['vllm']:.2f})")
    if per_step_gain > 0:
        print(f"vLLM's start-up is paid back after {startup / per_step_gain:.1f} steps")
    else:
        print("vLLM never pays here: a synced vLLM step is not faster than a sampler step")


if __name__ == "__main__":
    main()
