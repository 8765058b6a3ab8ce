"""dtype: auto per kind of work. float32 against bf16 on this machine, for sampling and for full-sequence passes.

``resolve_dtype(..., work)`` picks bf16 for ``sampling`` only with AMX and for ``forward`` (log-probs,
KL, scoring) with AVX-512 BF16 or AMX. This prints the measurements behind that table on the machine
it runs on, in one run, as ratios of tokens per second (bf16 / float32; above 1: bf16 faster):

- sampling: the ``generate`` stage's sampler, ``--prompts`` IFEval train prompts × ``--responses``,
  ``--max-new-tokens``, the model loaded in each dtype (as ``generate`` does);
- forward: no-grad summed log-probs (``logprobs.sequence_logprobs``) of the float32 run's sampled
  sequences, ``--batch`` at a time, float32 weights with bf16 autocast (as the KL passes do).

    python bench/dtype.py [--prompts 16] [--max-new-tokens 256]   # nothing else running

It also prints the CPU's bf16 features and what ``auto`` resolves to for each kind of work.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from rlhf_pipeline.process import configure_process

configure_process()  # as a stage's process is: before torch loads OpenMP

import torch

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.data import load_ifeval, split_prompts
from rlhf_pipeline.generation import generate_transformers
from rlhf_pipeline.logprobs import length_grouped_batches, sequence_logprobs
from rlhf_pipeline.models import (cpu_has_amx, cpu_has_native_bf16, load_policy, load_tokenizer, prepare_base_model,
                                  resolve_dtype)
from rlhf_pipeline.params import GenerateParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base", help="prepared model (made in a temp dir if missing)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per log-prob pass (evaluate's logprob_batch_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = Path(tempfile.mkdtemp()) / "base"
        prepare_base_model("smollm2-135m-instruct", model_dir)
    cpu = torch.device("cpu")
    print(f"AMX: {cpu_has_amx()}, native bf16 (AVX-512 BF16 or AMX): {cpu_has_native_bf16()}, "
          f"threads: {torch.get_num_threads()}; auto -> sampling {resolve_dtype('auto', cpu, 'sampling')}, "
          f"forward {resolve_dtype('auto', cpu, 'forward')}")
    table = split_prompts(load_ifeval(), None, 48, 32, args.seed).train.slice(0, args.prompts)
    prompts = list(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()))
    tok = load_tokenizer(model_dir)

    sampling, sequences = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        cfg = GenerateParams(num_responses=args.responses, max_new_tokens=args.max_new_tokens,
                             dtype=str(dtype).removeprefix("torch."))
        model = load_policy(model_dir, dtype, cpu)
        t0 = time.perf_counter()
        out = generate_transformers(model, tok, prompts, cfg, args.seed, progress=False)
        seconds = time.perf_counter() - t0
        tokens = sum(r.num_tokens for r in out)
        sampling[dtype] = tokens / seconds  # per token: the two dtypes sample different tokens
        print(f"sampling {str(dtype):15s}: {tokens:6d} tokens {seconds:7.1f} s {tokens / seconds:7.1f} tok/s")
        if sequences is None:
            ids = {pid: prompt_token_ids(tok, text) for pid, text in prompts}
            sequences = ([ids[r.prompt_id] for r in out], [list(r.token_ids) for r in out])

    model = load_policy(model_dir, torch.float32, cpu)
    forward = {}
    prompt_rows, response_rows = sequences
    lengths = [len(p) + len(r) for p, r in zip(prompt_rows, response_rows)]
    for dtype in (torch.float32, torch.bfloat16):
        context = (contextlib.nullcontext() if dtype == torch.float32 else
                   torch.autocast("cpu", dtype=torch.bfloat16))
        t0 = time.perf_counter()
        with torch.no_grad(), context:
            for idx in length_grouped_batches(lengths, args.batch):
                sequence_logprobs(model, [prompt_rows[i] for i in idx], [response_rows[i] for i in idx],
                                  tok.pad_token_id, 1.0)
        seconds = time.perf_counter() - t0
        forward[dtype] = sum(lengths) / seconds
        print(f"forward  {str(dtype):15s}: {sum(lengths):6d} tokens {seconds:7.1f} s {forward[dtype]:7.1f} tok/s")
    print(f"ratio bf16 / float32 tok/s: sampling {sampling[torch.bfloat16] / sampling[torch.float32]:.2f}, "
          f"forward {forward[torch.bfloat16] / forward[torch.float32]:.2f} (above 1: bf16 faster)")


if __name__ == "__main__":
    main()
