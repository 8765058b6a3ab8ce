"""Generation speed: the `generate` stage's sampler against a plain `model.generate` loop, and
against the CPU's fp32 compute limit, all measured in one run.

Same prompts (IFEval train prompts), responses per prompt, sequences per batch, dtype and
max_new_tokens. The baseline is what one would write with transformers directly: default
attention, prompts in arrival order, `num_return_sequences=N`, `do_sample=True`. Tokens count
generated tokens up to and including the end-of-turn token (padding after it is not counted).

The compute limit: the best GFLOP/s, in the run's dtype, of a decode-shaped (64 x 576 x 1536) and a
square 2048 matmul on all the process's threads, divided by 2 x parameters FLOP per generated token
(bf16 on a CPU with AMX: about 1,900 GFLOP/s, 5x float32's).

With ``--compete``, the stage runs a second time beside one CPU-bound process (a pure-Python busy
loop, as a browser tab or a second experiment would be) and the slowdown factor is printed.

With ``--vllm`` (in the vLLM environment, ``make venv-vllm``), the same work also runs through the
real vLLM (``generation.generate_vllm``: one request per response, its seed), in the same process:
the engine's start-up, its tokens/s against the stage's sampler, its fraction of the compute limit,
and the share of responses whose tokens are identical when half the requests are rerun in another
batch composition (reversed order).

    python bench/generate.py [--prompts 32] [--responses 4] [--max-new-tokens 128] [--batch-size 64]
                             [--compete] [--skip-baseline] [--vllm]

Prints tokens/s of each, the ratio (goal >= 5x plain generate) and the fraction of the compute limit
(moonshot >= 0.5).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

from rlhf_pipeline.process import configure_process

configure_process()  # as a stage's process is: before torch loads OpenMP

import torch

from rlhf_pipeline.chat import chat_messages
from rlhf_pipeline.data import load_ifeval, split_prompts
from rlhf_pipeline.generation import generate_transformers, stop_token_ids
from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, prepare_base_model, resolve_dtype
from rlhf_pipeline.params import GenerateParams

from compute_limit import matmul_gflops  # bench/ is on sys.path when run as a script


def baseline(model_dir, prompts, cfg, dtype, seed) -> int:
    """Plain transformers: batches in arrival order, num_return_sequences, do_sample. Returns tokens."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(default_device()).eval()
    stops = set(stop_token_ids(tok, model.config))
    torch.manual_seed(seed)
    per_batch = max(1, cfg.batch_size // cfg.num_responses)
    tokens = 0
    for start in range(0, len(prompts), per_batch):
        texts = [tok.apply_chat_template(chat_messages(p), tokenize=False, add_generation_prompt=True)
                 for _, p in prompts[start:start + per_batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_responses,
                                 pad_token_id=tok.pad_token_id, eos_token_id=sorted(stops))
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            tokens += ends[0] + 1 if ends else len(row)
    return tokens


def busy_loop() -> None:  # pragma: no cover - runs in the competing process
    while True:
        pass


def run_stage(model, tok, prompts, cfg, seed) -> tuple[int, float]:
    t0 = time.perf_counter()
    ours = generate_transformers(model, tok, prompts, cfg, seed, progress=False)
    return sum(r.num_tokens for r in ours), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base", help="prepared model (made in a temp dir if missing)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compete", action="store_true", help="also run the stage beside one busy process")
    ap.add_argument("--skip-baseline", action="store_true", help="leave out the plain model.generate loop")
    ap.add_argument("--vllm", action="store_true", help="also the real vLLM on the same work (make venv-vllm)")
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = Path(tempfile.mkdtemp()) / "base"
        prepare_base_model("smollm2-135m-instruct", model_dir)
    split = split_prompts(load_ifeval(), None, 48, 32, args.seed)  # the default test and val sizes
    table = split.train.slice(0, args.prompts)
    prompts = list(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()))
    cfg = GenerateParams(num_responses=args.responses, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, dtype=args.dtype)
    device = default_device()
    dtype = resolve_dtype(cfg.dtype, device, "sampling")
    print(f"{len(prompts)} prompts x {cfg.num_responses} responses, max_new_tokens={cfg.max_new_tokens}, "
          f"batch_size={cfg.batch_size}, dtype={dtype}, device={device.type}, threads={torch.get_num_threads()}")

    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, dtype)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu":
        gflops = matmul_gflops(dtype)
        limit = gflops * 1e9 / (2 * params)
        print(f"compute limit           : {gflops:.1f} GFLOP/s matmul / (2 x {params / 1e6:.1f} M params) "
              f"= {limit:.0f} tok/s")

    base_rate = None
    if not args.skip_baseline:
        t0 = time.perf_counter()
        base_tokens = baseline(model_dir, prompts, cfg, dtype, args.seed)
        base_s = time.perf_counter() - t0
        base_rate = base_tokens / base_s
        print(f"baseline model.generate : {base_tokens:6d} tokens {base_s:7.1f} s {base_rate:7.1f} tok/s")

    tokens, seconds = run_stage(model, tok, prompts, cfg, args.seed)
    rate = tokens / seconds
    print(f"generate stage          : {tokens:6d} tokens {seconds:7.1f} s {rate:7.1f} tok/s")
    if base_rate:
        print(f"ratio (stage / baseline tokens/s): {rate / base_rate:.2f}")
    if device.type == "cpu":
        print(f"fraction of the compute limit: {rate / limit:.2f}")
    if args.compete:
        rival = multiprocessing.get_context("spawn").Process(target=busy_loop, daemon=True)
        rival.start()
        try:
            tokens_c, seconds_c = run_stage(model, tok, prompts, cfg, args.seed)
        finally:
            rival.terminate()
        print(f"beside one busy process : {tokens_c:6d} tokens {seconds_c:7.1f} s {tokens_c / seconds_c:7.1f} tok/s "
              f"(same tokens: {tokens_c == tokens})")
        print(f"slowdown with one competing process: {seconds_c / seconds:.2f}x")
    if args.vllm:
        run_vllm(model_dir, tok, prompts, cfg, str(dtype).removeprefix("torch."), args.seed, rate,
                 limit if device.type == "cpu" else None)


def run_vllm(model_dir, tok, prompts, cfg, dtype: str, seed: int, stage_rate: float, limit: float | None) -> None:
    """The real vLLM on the stage's work: start-up, tokens/s, and identical tokens on a rerun of half
    the requests in reversed order (another batch composition)."""
    from rlhf_pipeline.generation import generate_vllm, vllm_engine

    t0 = time.perf_counter()
    llm = vllm_engine(model_dir, dtype, seed)
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = generate_vllm(model_dir, tok, prompts, cfg, seed, dtype, llm=llm)
    seconds = time.perf_counter() - t0
    tokens = sum(r.num_tokens for r in first)
    rate = tokens / seconds
    print(f"vLLM engine start-up    : {start:7.1f} s")
    print(f"vLLM                    : {tokens:6d} tokens {seconds:7.1f} s {rate:7.1f} tok/s "
          f"(ratio to the stage's sampler: {rate / stage_rate:.2f})")
    if limit:
        print(f"vLLM fraction of the compute limit: {rate / limit:.2f}")
    half = prompts[: max(1, len(prompts) // 2)][::-1]
    again = {(r.prompt_id, r.response_idx): r.token_ids for r in generate_vllm(model_dir, tok, half, cfg, seed, dtype,
                                                                                 llm=llm)}
    same = sum(again[(r.prompt_id, r.response_idx)] == r.token_ids for r in first if (r.prompt_id, r.response_idx)
               in again)
    print(f"vLLM rerun of {len(again)} responses in reversed order: {same}/{len(again)} identical token ids")


if __name__ == "__main__":
    main()
