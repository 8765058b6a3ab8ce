"""Sampling N responses per prompt (REBEL recipe, part 1): transformers and vLLM backends.

Every response has its own seed, derived from ``(seed, prompt_id, response_idx)`` and stored next
to it, with the token ids exactly as sampled (:func:`response_token_ids`: the rule every later
stage uses). The transformers backend draws each response's tokens from its own ``torch.Generator``, so
a response depends on its seed and prompt, not on which other prompts share its batch (up to the
float rounding that batching itself causes). vLLM gets the same seed per request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from rlhf_pipeline.chat import prompt_token_ids
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import SamplingParams
from rlhf_pipeline.schemas import GENERATIONS

log = logging.getLogger(__name__)



def response_token_ids(new_tokens: list[int], stop_ids: set[int] | list[int]) -> tuple[list[int], str]:
    """The token ids of a sampled response, and its finish reason: the one rule for both.

    A response is the generated tokens up to and including the first stop (end-of-turn) token;
    tokens a batch generated after it are not part of it. The end-of-turn token belongs to the
    response only where it was generated: a response cut at ``max_new_tokens`` ends without one.
    These ids, stored in the generations file (``schemas.GENERATIONS``), are what ``pairs`` copies
    into chosen and rejected ids and what ``ref_logprobs``, ``train`` and ``evaluate`` score:
    log-probs are of the tokens sampled, never of a re-tokenization of the text or of an
    end-of-turn token that was never drawn.

    Returns:
        (ids, shape (response_tokens,); ``"stop"`` if they end with a stop token, else ``"length"``).
    """
    stop = set(stop_ids)
    for i, t in enumerate(new_tokens):
        if t in stop:
            return list(new_tokens[: i + 1]), "stop"
    return list(new_tokens), "length"


def response_seed(seed: int, prompt_id: str, response_idx: int) -> int:
    """The sampling seed of one response: 31 bits of SHA-256 of ``seed:prompt_id:response_idx``.

    It depends only on its own prompt and index, so adding prompts to a run leaves the seeds (and
    so the responses) of the others unchanged.
    """
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{response_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


@dataclass
class Response:
    prompt_id: str
    response_idx: int
    response: str
    num_tokens: int  # generated tokens, the end-of-turn token included when produced
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    seed: int
    token_ids: list[int]  # as sampled (response_token_ids)


def responses_table(responses: list[Response]) -> pa.Table:
    """The generations table (``schemas.GENERATIONS``), sorted by (prompt_id, response_idx)."""
    rows = sorted(responses, key=lambda r: (r.prompt_id, r.response_idx))
    return pa.Table.from_pylist([r.__dict__ for r in rows], schema=GENERATIONS)


class SeededSampler:
    """A logits processor that draws each row's next token from that row's own generator.

    Nucleus sampling (Holtzman et al., arXiv 1904.09751) at ``temperature``: keep the most
    probable tokens until their mass reaches ``top_p``, renormalise, and draw by inverting the CDF with one uniform from
    the row's generator. The nucleus is found with a ``topk`` that grows until every row's mass
    reaches ``top_p``, instead of sorting the whole vocabulary (on 64 x 49152 logits that sort
    alone took 0.19 s per step on 2 CPU cores). This is the set transformers' ``TopPLogitsWarper``
    keeps in nearly every row, not all: tied probabilities at the boundary, and cumulative sums
    that round differently in float32 (ours adds from the most probable token, transformers' from
    the least), change the last token kept in about 0.07 % of rows measured on real logits.

    It returns scores that are 0 at the drawn token and -inf elsewhere, so ``generate`` run in
    greedy mode emits exactly the drawn token. ``temperature`` 0 is greedy decoding (the most
    probable token, ties to the lowest id; no random draw).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 first_k: int = 64):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.first_k = first_k

    def nucleus(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids), both (batch, k), most probable first, zero outside the
        nucleus; rows do not sum to 1."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (batch, vocab)
        if self.top_p >= 1.0:  # the whole vocabulary; a float cumsum can pass 1 before its end
            return probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
        k = min(self.first_k, probs.shape[-1])
        while True:
            top, ids = probs.topk(k, dim=-1)
            before = top.cumsum(-1) - top  # mass of the more probable tokens
            if k == probs.shape[-1] or bool((before[:, -1] >= self.top_p).all()):
                break
            k = min(4 * k, probs.shape[-1])
        return top.masked_fill(before >= self.top_p, 0.0), ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            drawn = scores.argmax(-1, keepdim=True)
            return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)
        top, ids = self.nucleus(scores)
        cdf = top.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in self.generators])
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=top.shape[-1] - 1)
        drawn = ids.gather(1, pos)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, max_len), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def _sample_batch(model, prompts: list[list[int]], seeds: list[list[int]], cfg: SamplingParams,
                  pad_id: int, stop_ids: list[int]) -> list[tuple[list[int], str]]:
    """Sample ``len(seeds[i])`` responses for each prompt of a batch.

    The prompts are prefilled once (all but their last token), and the KV cache is repeated for
    the N responses, instead of prefilling N identical copies as ``num_return_sequences`` does.
    Decoding uses exactly ``cfg``: ``use_model_defaults=False`` keeps the model folder's
    ``generation_config.json`` (a ``repetition_penalty``, ``top_k``, ``temperature``, …) out of it.

    Returns:
        per prompt-major response: (token ids, finish reason) by :func:`response_token_ids`.
    """
    from transformers import DynamicCache, GenerationConfig

    device = model.device
    n = len(seeds[0])
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache()
    if ids.shape[1] > 1:
        # Same position ids as generate() derives from the mask, so prefill and decode agree.
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=stop_ids, pad_token_id=pad_id,
                               bos_token_id=model.generation_config.bos_token_id)
    sampler = SeededSampler([s for row in seeds for s in row], cfg.temperature, cfg.top_p, device)
    out = model.generate(
        input_ids=ids.repeat_interleave(n, 0),
        attention_mask=mask.repeat_interleave(n, 0),
        past_key_values=cache if ids.shape[1] > 1 else None,
        generation_config=gen_cfg,
        use_model_defaults=False,
        logits_processor=[sampler],
    )
    new = out[:, ids.shape[1]:].tolist()
    return [response_token_ids(row, stop_ids) for row in new]


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's ``eos_token_id``(s)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def generate_transformers(model, tokenizer, prompts: list[tuple[str, str]], cfg: SamplingParams,
                          seed: int, progress: bool = True) -> list[Response]:
    """Sample ``cfg.num_responses`` responses per (prompt_id, prompt) with transformers.

    Prompts are grouped by token length (longest first, so an out-of-memory shows at once) into
    batches of ``max(1, cfg.batch_size // cfg.num_responses)`` prompts, left-padded with an
    attention mask.

    Returns:
        one :class:`Response` per (prompt, response_idx), in no particular order.
    """
    n = cfg.num_responses
    stop_ids = stop_token_ids(tokenizer, model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    encoded = [(pid, prompt_token_ids(tokenizer, text)) for pid, text in prompts]
    encoded.sort(key=lambda e: (-len(e[1]), e[0]))
    per_batch = max(1, cfg.batch_size // n)
    results: list[Response] = []
    bar = tqdm(total=len(encoded) * n, unit="resp", desc="generate", disable=not progress)
    for start in range(0, len(encoded), per_batch):
        batch = encoded[start:start + per_batch]
        seeds = [[response_seed(seed, pid, k) for k in range(n)] for pid, _ in batch]
        outs = _sample_batch(model, [ids for _, ids in batch], seeds, cfg, pad_id, stop_ids)
        for j, (tokens, finish) in enumerate(outs):
            pid, k = batch[j // n][0], j % n
            text_tokens = tokens[:-1] if finish == "stop" else tokens
            results.append(Response(pid, k, tokenizer.decode(text_tokens, skip_special_tokens=True),
                                    len(tokens), finish, seeds[j // n][k], tokens))
        bar.update(len(outs))
        bar.set_postfix(tokens=sum(r.num_tokens for r in results))
    bar.close()
    return results


def generate_vllm(model_dir: str | os.PathLike, tokenizer, prompts: list[tuple[str, str]],
                  cfg: SamplingParams, seed: int, dtype: str) -> list[Response]:
    """Sample with vLLM (GPU): one request per response, each with its own seed.

    ``SamplingParams(n=N, seed=s)`` would give the N responses one seed between them; separate
    requests keep one seed per response, and vLLM's prefix caching still computes each prompt's
    prefill once. ``generation_config="vllm"`` keeps the model folder's generation defaults out of
    the sampling settings, as the transformers backend does. Imported only here: vLLM pins its own torch and lives in its own environment
    (``envs/vllm.txt``).

    Raises:
        PipelineError: vLLM is not installed in the running environment.
    """
    try:
        from vllm import LLM
        from vllm import SamplingParams as VllmSamplingParams
    except ImportError:
        raise PipelineError("generate.backend: 'vllm' is not installed here; see envs/README.md") from None
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=cfg.tensor_parallel_size,
              dtype=dtype, seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
              enable_prefix_caching=True, generation_config="vllm")
    stop_ids = stop_token_ids(tokenizer, llm.llm_engine.model_config.hf_config)
    requests, params, keys = [], [], []
    for pid, text in prompts:
        ids = prompt_token_ids(tokenizer, text)
        for k in range(cfg.num_responses):
            s = response_seed(seed, pid, k)
            requests.append({"prompt_token_ids": ids})
            params.append(VllmSamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                                         max_tokens=cfg.max_new_tokens, seed=s, stop_token_ids=stop_ids))
            keys.append((pid, k, s))
    outputs = llm.generate(requests, sampling_params=params, use_tqdm=True)
    results = []
    for (pid, k, s), out in zip(keys, outputs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason == "stop" and not (tokens and tokens[-1] in stop_ids):
            # vLLM names the stop token it stopped on in stop_reason (None for the model's own EOS)
            tokens.append(completion.stop_reason if isinstance(completion.stop_reason, int) else stop_ids[0])
        tokens, finish = response_token_ids(tokens, stop_ids)
        results.append(Response(pid, k, completion.text, len(tokens), finish, s, tokens))
    return results


def generation_metrics(responses: list[Response], seconds: float) -> dict:
    """Counts and speed of a generation run (tokens, seconds, tokens/s, truncated share)."""
    tokens = sum(r.num_tokens for r in responses)
    return {
        "responses": len(responses),
        "prompts": len({r.prompt_id for r in responses}),
        "tokens_generated": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else float("nan"),
        "truncated_share": round(sum(r.finish_reason == "length" for r in responses) / max(1, len(responses)), 4),
        "mean_response_tokens": round(tokens / max(1, len(responses)), 2),
    }


def run_generation(model_dir: str | Path, prompts: list[tuple[str, str]], cfg: SamplingParams,
                   seed: int, progress: bool = True) -> tuple[pa.Table, dict]:
    """Load the policy from ``model_dir`` and sample responses with ``cfg.backend``.

    Returns:
        (generations table, ``schemas.GENERATIONS``; metrics dict).
    """
    from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, resolve_dtype

    torch.manual_seed(seed)  # nothing should draw from the global generator; this pins it if it does
    tokenizer = load_tokenizer(model_dir)
    device = default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    if cfg.backend == "vllm":
        responses = generate_vllm(model_dir, tokenizer, prompts, cfg, seed, str(dtype).removeprefix("torch."))
        load_seconds = 0.0
    else:
        model = load_policy(model_dir, dtype, device)
        load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        responses = generate_transformers(model, tokenizer, prompts, cfg, seed, progress)
    metrics = generation_metrics(responses, time.perf_counter() - t0)
    metrics.update(backend=cfg.backend, dtype=str(dtype).removeprefix("torch."), device=device.type,
                   load_seconds=round(load_seconds, 3), batch_size=cfg.batch_size)
    return responses_table(responses), metrics
