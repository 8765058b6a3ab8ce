"""Response log-probs of a causal LM (summed, or per token for online RL), with dynamic padding per
micro-batch.

Used for the reference policy π0 once (``ref_logprobs`` stage) and for the policy πθ in every
training step. Prompt and response are concatenated per row and right-padded only to the longest
row of the micro-batch; micro-batches are grouped by length so padding stays small.
"""

from __future__ import annotations

import torch


def length_grouped_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in micro-batches of ``batch_size``, longest rows first, ties by index.

    Longest first, so a micro-batch that does not fit in memory fails at the start.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate prompt + response per row and right-pad to the longest row.

    Returns:
        input_ids (batch, width), attention_mask (batch, width), and response_mask
        (batch, width), 1 at the positions of response tokens.
    """
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    resp = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p): len(p) + len(r)] = 1
    return ids, attn, resp


def _response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict response tokens.

    Returns:
        logits (batch, width, vocab) float32 divided by ``temperature``, where position t predicts
        ``targets[:, t]``; targets (batch, width) token ids; mask (batch, width), 1 where the
        target is a response token. ``width`` starts at the shortest prompt's first response token.
    """
    out, targets, mask = _response_forward(model, prompts, responses, pad_id)
    return out.logits[:, :-1].float() / temperature, targets, mask


def _response_forward(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """The model's output on the kept positions (``logits_to_keep``: from the shortest prompt's last
    token on), with the targets and response mask of :func:`_response_logits`."""
    ids, attn, resp = pad_sequences(prompts, responses, pad_id)
    device = next(model.parameters()).device  # works through DDP/DeepSpeed wrappers too
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    # Logits are only needed from the first response position on: skip the lm_head on the
    # shared prompt prefix (the vocabulary projection is the largest matmul of a small model).
    first = min(len(p) for p in prompts)
    keep = ids.shape[1] - first + 1
    out = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep)  # logits (batch, keep, vocab)
    return out, ids[:, first:], resp[:, first:]


def _left_align(per_position: torch.Tensor, prompts: list[list[int]], responses: list[list[int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, width) values at the kept positions (column t predicts the token at ``first + t``) ->
    (values (batch, T), mask (batch, T)): row i's response tokens at 0..len_i−1, 0 after."""
    device = per_position.device
    first = min(len(p) for p in prompts)
    longest = max(len(r) for r in responses)
    # row i's response starts len(prompt_i) - first columns into the logits kept
    offsets = torch.tensor([len(p) - first for p in prompts], device=device)
    positions = torch.arange(longest, device=device)
    index = (offsets[:, None] + positions[None, :]).clamp(max=per_position.shape[1] - 1)
    mask = (positions[None, :] < torch.tensor([len(r) for r in responses], device=device)[:, None]).float()
    return per_position.gather(1, index) * mask, mask


def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at ``targets``: (batch, width, vocab), (batch, width) -> (batch, width)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Sum over response tokens of log πθ(token | prefix), logits divided by ``temperature``.

    Args:
        prompts, responses: token id lists per row (no padding).
        temperature: the sampling temperature; the REBEL reference divides logits by it so the
            log-probs are those of the distribution the responses were sampled from.

    Returns:
        (batch,) float32 tensor of summed log-probs, in nats, on the model's device. Gradients flow
        when called outside ``torch.no_grad``.
    """
    logits, targets, mask = _response_logits(model, prompts, responses, pad_id, temperature)
    return (_picked_logprobs(logits, targets) * mask).sum(-1)


def token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log πθ(y_t | x, y_<t) of each response, logits divided by ``temperature``,
    left-aligned (online RL's per-token layout, ``rlhf_pipeline.advantages``). One forward pass (a
    micro-batch); gradients flow outside ``torch.no_grad``.

    Returns:
        (logprobs (batch, T) float32, mask (batch, T) float32), T the longest response, both on the
        model's device; ``logprobs`` is 0 where ``mask`` is 0. Summed over t, a row equals
        :func:`sequence_logprobs` of the same row.
    """
    logits, targets, _ = _response_logits(model, prompts, responses, pad_id, temperature)
    return _left_align(_picked_logprobs(logits, targets), prompts, responses)


def token_logprobs_and_values(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` and the value model's V(s_t) from one forward pass of a policy-and-value
    module (``online.PolicyAndValue``, whose output has ``values`` (batch, kept positions) beside
    ``logits``): V(s_t) is read where the policy's logits for y_t are, at the last token of x, y_<t.

    Returns:
        (logprobs (batch, T) nats, values (batch, T) reward units, mask (batch, T)), 0 after each
        response; gradients flow to both models outside ``torch.no_grad``.
    """
    out, targets, _ = _response_forward(model, prompts, responses, pad_id)
    logps, mask = _left_align(_picked_logprobs(out.logits[:, :-1].float() / temperature, targets), prompts,
                              responses)
    values, _ = _left_align(out.values[:, :-1].float(), prompts, responses)
    return logps, values, mask


@torch.no_grad()
def response_kl(policy, reference, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                temperature: float, batch_size: int, autocast_dtype: torch.dtype | None = None,
                progress: bool = True, desc: str = "KL") -> dict[str, list[float]]:
    """Per (prompt, response) row, the policy's and the reference's summed log-probs and the
    full-vocabulary KL summed along the response.

    ``kl`` is Σ_t KL(πθ(·|x, y<t) ‖ π0(·|x, y<t)) over the response positions t, every next-token
    distribution at logits / ``temperature``. By the chain rule of KL its mean over responses
    y ~ πθ(·|x) estimates the sequence-level KL(πθ(·|x) ‖ π0(·|x)), as the log-ratio
    log πθ(y|x) − log π0(y|x) does, with less variance: it is the log-ratio's conditional
    expectation given each prefix (J. Schulman, "Approximating KL divergence", 2020). Unlike the
    log-ratio it is never negative, and on greedy responses it is still a KL (along that path).

    Returns:
        ``{"policy": [...], "reference": [...], "kl": [...]}``, one float per row each, nats.
    """
    from tqdm.auto import tqdm

    out: dict[str, list[float]] = {k: [0.0] * len(prompts) for k in ("policy", "reference", "kl")}
    device_type = next(policy.parameters()).device.type
    batches = length_grouped_batches([len(p) + len(r) for p, r in zip(prompts, responses)], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress):
        rows = ([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, temperature)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits, targets, mask = _response_logits(policy, *rows)
            logp = logits.log_softmax(-1)
            del logits
            ref_logits, _, _ = _response_logits(reference, *rows)
            ref_logp = ref_logits.log_softmax(-1)
            del ref_logits
        picked = {name: (lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
                  for name, lp in (("policy", logp), ("reference", ref_logp))}
        kl = ((logp.exp() * (logp - ref_logp)).sum(-1) * mask).sum(-1)
        for j, i in enumerate(idx):
            out["policy"][i] = picked["policy"][j].item()
            out["reference"][i] = picked["reference"][j].item()
            out["kl"][i] = kl[j].item()
    return out


def check_context_length(lengths: list[int], max_positions: int | None, where: str,
                         limit_keys: str = "pairs.max_prompt_tokens / pairs.max_response_tokens") -> None:
    """Fail before any forward pass if a prompt + response exceeds the model's context.

    ``limit_keys``: the params keys that bound the lengths, named in the message.

    Raises:
        PipelineError: naming the longest row and the limit.
    """
    from rlhf_pipeline.errors import PipelineError

    if max_positions and lengths and max(lengths) > max_positions:
        row = max(range(len(lengths)), key=lengths.__getitem__)
        raise PipelineError(f"{where}: row {row} has {lengths[row]} tokens, more than the model's context "
                            f"of {max_positions} (lower {limit_keys})")


@torch.no_grad()
def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperature: float, batch_size: int, autocast_dtype: torch.dtype | None = None,
                      progress: bool = True, desc: str = "log-probs") -> list[float]:
    """No-grad summed log-probs of each (prompt, response) row, micro-batched by length.

    ``autocast_dtype``: run the forward pass under ``torch.autocast`` in that dtype (bf16 where the
    device computes it natively); None runs in the model's own dtype.

    Returns:
        one float per row, in the order of the rows, nats.
    """
    from tqdm.auto import tqdm

    out = [0.0] * len(prompts)
    device_type = next(model.parameters()).device.type
    batches = length_grouped_batches([len(p) + len(r) for p, r in zip(prompts, responses)], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            values = sequence_logprobs(model, [prompts[i] for i in idx], [responses[i] for i in idx],
                                       pad_id, temperature)
        for i, v in zip(idx, values.tolist()):
            out[i] = v
    return out


@torch.no_grad()
def batched_token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                           temperature: float, batch_size: int) -> torch.Tensor:
    """No-grad :func:`token_logprobs` of many rows, micro-batched by length.

    Returns:
        (rows, T) float32 on the CPU, T the longest response of all rows, 0 after each response.
    """
    out = torch.zeros(len(prompts), max(len(r) for r in responses))
    for idx in length_grouped_batches([len(p) + len(r) for p, r in zip(prompts, responses)], batch_size):
        logps, _ = token_logprobs(model, [prompts[i] for i in idx], [responses[i] for i in idx], pad_id, temperature)
        out[idx, : logps.shape[1]] = logps.float().cpu()
    return out


def pair_logprobs(model, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                  pad_id: int, temperature: float, batch_size: int, autocast_dtype: torch.dtype | None = None,
                  progress: bool = True) -> tuple[list[float], list[float]]:
    """No-grad summed log-probs of each pair's chosen and rejected response; the 2N sequences are
    batched together by length (:func:`response_logprobs`).

    Returns:
        (chosen log-probs, rejected log-probs), N floats each, nats.
    """
    out = response_logprobs(model, [p for p in prompts for _ in (0, 1)],
                            [r for c, rj in zip(chosen, rejected) for r in (c, rj)],
                            pad_id, temperature, batch_size, autocast_dtype, progress)
    return out[0::2], out[1::2]
