"""Peak memory of one online PPO micro-batch (policy and critic, forward and backward), with and
without gradient checkpointing.

An online PPO update runs :func:`rlhf_pipeline.logprobs.token_logprobs_and_values` on a micro-batch
of ``online.per_device_train_batch_size`` (prompt, response) rows through the policy and its critic
(``online.PolicyAndValue``: two copies of the transformer), then backward. Its memory grows with
the padded width of the micro-batch: rows are right-padded to the longest, and the policy's logits
are kept from the shortest prompt's end on, so one long prompt makes every row wide. The train
prompts run from about 50 to 1 020 tokens (chat template included).

Each case runs in its own process (peak RSS is per process), configured as a stage's
process is (``configure_process``: freed memory stays in the heap), on the prepared base model in
float32 (``online.dtype``) with random token ids (memory does not depend on which tokens):
    python bench/ppo_memory.py --model models/base
Prints, per case, the peak RSS after the forward and after the backward pass (GB) and the seconds
the two took. Nothing here is compared by value; run it with nothing else running.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

#: (name, prompt lengths of the micro-batch's rows): all short (the train prompts' median is about
#: 130 tokens), two short and two long (right padding makes every row long), all long
CASES = [("4 short", [130] * 4), ("2 short + 2 long", [50, 1000, 50, 1000]), ("4 long", [1000] * 4)]


def peak_gb() -> float:
    """This process's peak RSS as the stages record it (``peak_rss_mb``), in GB of 10^6 KiB, the unit of
    ``/usr/bin/time -v``'s maximum resident set size / 10^6 that the docs quote beside it."""
    from rlhf_pipeline.cli import peak_rss_mb

    return peak_rss_mb() * 1024 / 1e6


def one_case(model_dir: str, prompt_lengths: list[int], response_length: int, checkpointing: bool) -> None:
    from rlhf_pipeline.process import configure_process

    configure_process()  # as a stage's process is: before torch loads OpenMP
    import torch

    from rlhf_pipeline.logprobs import token_logprobs_and_values
    from rlhf_pipeline.models import load_policy
    from rlhf_pipeline.online import PolicyAndValue, load_value_model

    cpu = torch.device("cpu")
    model = PolicyAndValue(load_policy(model_dir, torch.float32, cpu), load_value_model(model_dir, torch.float32, cpu))
    model.train()
    if checkpointing:  # as training.train_policy enables it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(100, 40000, (response_length,), generator=g).tolist() for _ in prompt_lengths]
    loaded = peak_gb()
    t0 = time.perf_counter()
    logps, values, _ = token_logprobs_and_values(model, prompts, responses, pad_id=2, temperature=0.8)
    forward = peak_gb()
    (logps.sum() + values.sum()).backward()
    print(f"{loaded:.1f} {forward:.1f} {peak_gb():.1f} {time.perf_counter() - t0:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base", help="a prepared policy folder")
    ap.add_argument("--response-length", type=int, default=256, help="tokens per response (online.max_new_tokens)")
    ap.add_argument("--one", nargs=2, metavar=("PROMPT_LENGTHS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one_case(args.model, [int(n) for n in args.one[0].split(",")], args.response_length, args.one[1] == "1")
        return
    print(f"{'micro-batch (prompt tokens)':<36} {'checkpointing':>13} {'loaded':>7} {'forward':>8} {'backward':>9} "
          f"{'s':>6}")
    for name, lengths in CASES:
        for checkpointing in (False, True):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--response-length",
                                  str(args.response_length), "--one", ",".join(map(str, lengths)),
                                  str(int(checkpointing))], capture_output=True, text=True, check=True)
            loaded, forward, backward, seconds = out.stdout.split()
            label = f"{name} ({','.join(map(str, lengths))})"
            print(f"{label:<36} {str(checkpointing):>13} {loaded:>7} {forward:>8} {backward:>9} {seconds:>6}",
                  flush=True)
    print("peak RSS in GB after loading, after the forward pass, after the backward pass; s: forward + backward")


if __name__ == "__main__":
    main()
