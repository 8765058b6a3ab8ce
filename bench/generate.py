"""Generation speed: the `generate` stage's code against a plain `model.generate` loop.

Same prompts (IFEval train prompts), same responses per prompt, sequences per batch, dtype and
max_new_tokens, in one run. The baseline is what one would write with transformers directly:
default attention, prompts in arrival order, `num_return_sequences=N`, `do_sample=True`. Tokens
count generated tokens up to and including the end-of-turn token (padding after it is not counted).

    python bench/generate.py [--prompts 32] [--responses 4] [--max-new-tokens 128] [--batch-size 64]

Prints tokens/s of each and the ratio (goal >= 1.0; moonshot >= 1.3).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlhf_pipeline.chat import chat_messages
from rlhf_pipeline.data import load_ifeval, split_prompts
from rlhf_pipeline.generation import generate_transformers, stop_token_ids
from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, prepare_base_model, resolve_dtype
from rlhf_pipeline.params import GenerateParams


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/base", help="prepared model (made in a temp dir if missing)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = Path(tempfile.mkdtemp()) / "base"
        prepare_base_model("smollm2-135m-instruct", model_dir)
    split = split_prompts(load_ifeval(), None, 100, args.seed)
    table = split.train.slice(0, args.prompts)
    prompts = list(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()))
    cfg = GenerateParams(num_responses=args.responses, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, dtype=args.dtype)
    dtype = resolve_dtype(cfg.dtype, default_device())
    print(f"{len(prompts)} prompts x {cfg.num_responses} responses, max_new_tokens={cfg.max_new_tokens}, "
          f"batch_size={cfg.batch_size}, dtype={dtype}, threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    base_tokens = baseline(model_dir, prompts, cfg, dtype, args.seed)
    base_s = time.perf_counter() - t0
    print(f"baseline model.generate : {base_tokens:6d} tokens {base_s:7.1f} s {base_tokens / base_s:7.1f} tok/s")

    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, dtype)
    t0 = time.perf_counter()
    ours = generate_transformers(model, tok, prompts, cfg, args.seed, progress=False)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(r.num_tokens for r in ours)
    print(f"generate stage          : {ours_tokens:6d} tokens {ours_s:7.1f} s {ours_tokens / ours_s:7.1f} tok/s")
    print(f"ratio (stage / baseline tokens/s): {(ours_tokens / ours_s) / (base_tokens / base_s):.2f}")


if __name__ == "__main__":
    main()
