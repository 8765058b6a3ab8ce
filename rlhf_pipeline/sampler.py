"""A continuous-batching sampler for transformers causal LMs: one KV-cache slot per sequence.

``model.generate`` batches statically: a batch runs until its longest row ends, finished rows
keep being computed, and its ``DynamicCache`` concatenates every layer's keys and values at every
step (a copy of the whole cache per token). On a CPU those two costs, and repeating the grouped
key/value heads for every query head, made up most of a decode step. Here:

* **Slots.** ``slots`` sequences decode together. A sequence that ends frees its slot, and the
  next request is admitted into it at once (continuous batching, as in Orca, Yu et al. 2022, and
  vLLM), so a step computes live sequences only; when no request is left the live rows are packed
  into a smaller batch once fewer than half are live.
* **A preallocated cache.** :class:`SlotCache` holds (slots, kv_heads, max_len, head_dim) keys and
  values per layer; each slot writes its next column in place, at its own length.
* **The model's own attention** with a mask of ours: on CPU that is ``models.cpu_gqa_sdpa_attention``
  (grouped key/value heads read once, not copied per query head).
* **Shared prefill.** A prompt's KV is computed once for its N responses and copied into their slots.

Each sequence draws its tokens from its own ``torch.Generator`` (:func:`draw_tokens`), so its tokens
depend on its prompt, seed and the settings, not on which other sequences share its steps (up to
the float rounding of a batched matmul). The schedule is a pure function of the request order, so
a rerun is byte-identical.

Supports decoder-only models with rotary positions and full causal attention (Llama, SmolLM,
Qwen2, Mistral without a sliding window, ...): positions are passed per row, the 4D mask is ours.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rlhf_pipeline.errors import PipelineError

@dataclass(frozen=True)
class Request:
    """One sequence to sample: its prompt's token ids (at least one) and its seed."""

    prompt: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Completion:
    """A finished sequence: the index of its request, the tokens sampled (the stop token included
    when drawn), and why it ended: ``"stop"`` or ``"length"`` (``max_new_tokens`` reached);
    ``drawn``: tokens drawn so far by all sequences, finished or not (for a rate that does not
    lag behind the long sequences)."""

    index: int
    tokens: list[int]
    finish_reason: str
    drawn: int


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus (top-p set; Holtzman et al., arXiv 1904.09751) of each row.

    The most probable tokens are kept until the mass before a token reaches ``top_p``. The set is
    found with a ``topk`` of ``first_k`` tokens, grown 4x at a time only for the rows whose mass
    has not reached ``top_p`` yet, instead of sorting the vocabulary (on 64 x 49152 probabilities
    the sort alone took 0.19 s per step on 2 CPU cores, and growing every row's ``topk`` for one
    flat row 0.12 s). It is the set transformers' ``TopPLogitsWarper`` keeps in nearly every row, not
    all: tied probabilities at the boundary and float32 cumulative sums that round differently
    (ours adds from the most probable token, transformers' from the least) change the last token
    kept in about 0.07 % of rows measured on real logits.

    Args:
        probs: (rows, vocab) probabilities.

    Returns:
        (probabilities, token ids), both (rows, k), most probable first, zero (probability and id)
        outside the nucleus; rows do not sum to 1. ``top_p >= 1`` returns the whole vocabulary in
        id order.
    """
    vocab = probs.shape[-1]
    if top_p >= 1.0:  # the whole vocabulary; a float cumsum can pass 1 before its end
        return probs, torch.arange(vocab, device=probs.device).expand_as(probs)
    parts = []  # (row indices, kept probabilities, ids) per round
    rows = torch.arange(probs.shape[0], device=probs.device)
    k, sub = min(first_k, vocab), probs
    while rows.numel():
        top, ids = sub.topk(k, dim=-1)
        before = top.cumsum(-1) - top  # mass of the more probable tokens
        done = before[:, -1] >= top_p if k < vocab else torch.ones_like(rows, dtype=torch.bool)
        parts.append((rows[done], top[done].masked_fill(before[done] >= top_p, 0.0), ids[done]))
        rows, k = rows[~done], min(4 * k, vocab)
        sub = probs[rows]
    width = max(p.shape[1] for _, p, _ in parts)
    kept = probs.new_zeros((probs.shape[0], width))
    kept_ids = torch.zeros((probs.shape[0], width), dtype=torch.long, device=probs.device)
    for r, p, i in parts:
        kept[r, :p.shape[1]] = p
        kept_ids[r, :i.shape[1]] = i
    return kept, kept_ids


def draw_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float,
                top_p: float) -> torch.Tensor:
    """Each row's next token, drawn with that row's own generator.

    Nucleus sampling at ``temperature``: softmax(logits / temperature), keep the :func:`nucleus`,
    renormalise, and invert its CDF at one uniform draw from the row's generator (one draw per row
    and step, so a row's tokens do not depend on the other rows). ``temperature`` 0 is greedy
    decoding: the most probable token, ties to the lowest id, no draw.

    Args:
        logits: (rows, vocab), any float dtype.
        generators: one per row.

    Returns:
        (rows,) int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(-1)
    top, ids = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    cdf = top.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in generators])
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=top.shape[-1] - 1)
    return ids.gather(1, pos).squeeze(1)


class SlotCache:
    """Preallocated keys and values: (slots, kv_heads, max_len, head_dim) per layer.

    Passed to the model as ``cache`` (``past_key_values`` before transformers 5.24); the model calls :meth:`update` once per layer. Before
    a forward pass the caller sets which slots the batch rows are (:meth:`prefill` or :meth:`decode`).
    """

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._slots: torch.Tensor | None = None
        self._columns: torch.Tensor | None = None
        self._width = 0

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    def prefill(self, slots: torch.Tensor) -> None:
        """The next forward pass writes columns 0.. of ``slots`` (one per batch row)."""
        self._slots, self._columns = slots, None

    def decode(self, columns: torch.Tensor, width: int) -> None:
        """The next forward pass has one row per slot, each writing its column ``columns[slot]``;
        attention reads columns ``[0, width)``."""
        self._slots, self._columns, self._width = None, columns, width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values; return those the attention reads.

        Extra arguments are ignored: transformers passes them positionally (``cache_kwargs``, up to
        5.23) or as ``kwargs=`` (5.24 on), as its ``Cache.update(..., *args, **kwargs)`` allows.
        """
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._columns is None:  # prefill: the rows attend to their own prompt only
            q = key_states.shape[2]
            keys[self._slots, :, :q] = key_states
            values[self._slots, :, :q] = value_states
            return key_states, value_states
        rows = torch.arange(keys.shape[0], device=keys.device)
        keys[rows, :, self._columns] = key_states[:, :, 0]
        values[rows, :, self._columns] = value_states[:, :, 0]
        return keys[:, :, :self._width], values[:, :, :self._width]

    def copy(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy columns ``[0, length)`` of slots ``src`` into slots ``dst`` (same length)."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length] = t[src, :, :length]

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only ``slots``, renumbered 0.. in that order (packs live rows into a smaller batch)."""
        self.keys = [t.index_select(0, slots) for t in self.keys]
        self.values = [t.index_select(0, slots) for t in self.values]


def _cache_argument(model, cache: SlotCache) -> dict:
    """The keyword the model's forward takes its cache by: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _check_model(model, max_len: int) -> None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window is not None and window < max_len:
        raise PipelineError(f"generate: the slot sampler has no sliding-window attention ({config.model_type}, "
                            f"window {window} < {max_len} tokens)")
    if getattr(config, "max_position_embeddings", None) and max_len > config.max_position_embeddings:
        raise PipelineError(f"generate: prompt + max_new_tokens is {max_len + 1} tokens, more than the model's "
                            f"context of {config.max_position_embeddings}")


@torch.no_grad()
def sample(model, requests: Sequence[Request], *, slots: int, max_new_tokens: int, temperature: float,
           top_p: float, stop_ids: Sequence[int], pad_id: int) -> Iterator[Completion]:
    """Sample one sequence per request with continuous batching; yields each as it finishes.

    Requests are admitted in the order given, as slots free up; consecutive requests with the same
    prompt share one prefill. A sequence ends after a stop token (included) or ``max_new_tokens``.

    Args:
        model: a transformers causal LM whose attention takes an additive 4D mask (eager, sdpa,
            ``models.CPU_GQA_ATTENTION``).
        slots: sequences decoded together (the batch of a decode step).
        stop_ids: token ids that end a sequence.

    Yields:
        :class:`Completion`, in finishing order (callers key them by ``index``).

    Raises:
        PipelineError: an empty prompt, or a prompt + ``max_new_tokens`` longer than the model's
            context (before any forward pass).
    """
    if not requests:
        return
    if any(len(r.prompt) == 0 for r in requests):
        raise PipelineError("generate: a prompt has no tokens")
    max_len = max(len(r.prompt) for r in requests) - 1 + max_new_tokens
    _check_model(model, max_len)
    config = model.config
    device = model.device
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    slots = max(1, min(slots, len(requests)))
    cache = SlotCache(config.num_hidden_layers, slots, kv_heads, max_len, head_dim, model.dtype, device)
    yield from _run(model, cache, requests, max_new_tokens, temperature, top_p, set(stop_ids), pad_id, device)


def _run(model, cache: SlotCache, requests: Sequence[Request], max_new_tokens: int, temperature: float,
         top_p: float, stops: set[int], pad_id: int, device: torch.device) -> Iterator[Completion]:
    n_slots = cache.slots
    owner: list[int | None] = [None] * n_slots  # request index per slot
    length = [0] * n_slots  # KV columns written per slot (prompt[:-1] after prefill)
    next_token = [pad_id] * n_slots  # the token each slot feeds at its next step
    tokens: list[list[int]] = [[] for _ in range(n_slots)]
    generators: list[torch.Generator | None] = [None] * n_slots
    queue = 0  # the next request to admit
    drawn_total = 0

    while True:
        free = [s for s in range(n_slots) if owner[s] is None]
        if free and queue < len(requests):
            admitted = list(range(queue, min(len(requests), queue + len(free))))
            queue += len(admitted)
            free = free[:len(admitted)]
            _admit(model, cache, [requests[i] for i in admitted], free, device)
            for s, i in zip(free, admitted):
                owner[s], tokens[s] = i, []
                length[s], next_token[s] = len(requests[i].prompt) - 1, requests[i].prompt[-1]
                generators[s] = torch.Generator(device=device).manual_seed(requests[i].seed)
        live = [s for s in range(n_slots) if owner[s] is not None]
        if not live:
            return
        if queue == len(requests) and len(live) <= n_slots // 2:
            # No request left to fill the free slots: pack the live rows into a smaller batch.
            cache.keep(torch.tensor(live, device=device))
            owner, length, next_token, tokens, generators = ([xs[s] for s in live] for xs in
                                                              (owner, length, next_token, tokens, generators))
            n_slots, live = len(live), list(range(len(live)))
        drawn = _decode_step(model, cache, next_token, length, live, generators, temperature, top_p, device)
        drawn_total += len(drawn)
        for s, t in zip(live, drawn):
            tokens[s].append(t)
            length[s] += 1
            next_token[s] = t
            if t in stops or len(tokens[s]) >= max_new_tokens:
                yield Completion(owner[s], tokens[s], "stop" if t in stops else "length", drawn_total)
                owner[s], generators[s], length[s], next_token[s] = None, None, 0, pad_id


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive one every transformers attention takes (0 or dtype's min)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _admit(model, cache: SlotCache, requests: list[Request], slots: list[int], device: torch.device) -> None:
    """Prefill each distinct prompt (all but its last token) once, into the first of its slots, and
    copy it into the others.

    One forward pass per prompt: batching prompts of different lengths pads them to the longest
    (IFEval's run from 30 to 390 tokens; padded batches took 4x the prefill time measured here).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, s in zip(requests, slots):
        groups.setdefault(r.prompt, []).append(s)
    for prompt, group in groups.items():
        m = len(prompt) - 1
        if m == 0:
            continue
        causal = torch.ones((m, m), dtype=torch.bool, device=device).tril()[None, None]
        positions = torch.arange(m, device=device)
        cache.prefill(torch.tensor(group[:1], device=device))
        model(input_ids=torch.tensor([prompt[:-1]], device=device), attention_mask=_additive(causal, model.dtype),
              position_ids=positions[None], cache_position=positions, use_cache=True, logits_to_keep=1,
              **_cache_argument(model, cache))
        if len(group) > 1:
            cache.copy(torch.tensor(group[:1] * (len(group) - 1), device=device),
                       torch.tensor(group[1:], device=device), m)


def _decode_step(model, cache: SlotCache, next_token: list[int], length: list[int], live: list[int],
                 generators: list, temperature: float, top_p: float, device: torch.device) -> list[int]:
    """Feed every slot its next token at its own position; draw the live slots' next tokens."""
    columns = torch.tensor(length, device=device)
    width = max(length[s] for s in live) + 1
    mask = (torch.arange(width, device=device)[None, :] <= columns[:, None])[:, None, None, :]
    cache.decode(columns, width)
    logits = model(input_ids=torch.tensor(next_token, device=device)[:, None],
                   attention_mask=_additive(mask, model.dtype),
                   position_ids=columns[:, None], cache_position=columns[:1], use_cache=True,
                   logits_to_keep=1, **_cache_argument(model, cache)).logits[:, -1]  # (slots, vocab)
    if len(live) < logits.shape[0]:
        logits = logits[torch.tensor(live, device=device)]
    return draw_tokens(logits, [generators[s] for s in live], temperature, top_p).tolist()
