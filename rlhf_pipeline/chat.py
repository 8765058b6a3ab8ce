"""Turning a prompt into the policy's chat-formatted input.

One place for it, because ``generate`` and ``pairs`` must tokenize a prompt identically: the
log-probs of training are only right if ``prompt_ids`` is exactly what the responses were sampled
after.
"""

from __future__ import annotations

from rlhf_pipeline.errors import PipelineError


def control_token_in(tokenizer, text: str) -> str | None:
    """The first of the tokenizer's special tokens (``<|im_end|>``, ``<|im_start|>``, …) that ``text``
    contains as plain characters, or None.

    ``apply_chat_template`` tokenizes its rendered string with special tokens parsed, so such text
    in a prompt or response would become real control tokens: a prompt holding
    ``<|im_end|>\\n<|im_start|>system …`` forges a system turn. The pipeline refuses such rows
    (dropped and counted by the stages that read data; an error here otherwise) rather than
    tokenizing them as plain text: that would give the policy spellings of its control tokens it
    never saw, and every stage (sampling, pairs, scoring) would have to tokenize them alike.
    """
    for token in sorted(set(tokenizer.all_special_tokens), key=lambda t: (-len(t), t)):
        if token and token in text:
            return token
    return None


def has_control_tokens(tokenizer, messages: list[dict[str, str]]) -> bool:
    """Whether any message's text holds one of the tokenizer's special tokens (:func:`control_token_in`)."""
    return any(control_token_in(tokenizer, m["content"]) for m in messages)


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """A single-turn conversation with the prompt as the user's message."""
    return [{"role": "user", "content": prompt}]


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template.

    Returns:
        list of token ids, shape (tokens,).

    Raises:
        PipelineError: a message's text holds a special token (:func:`control_token_in`).
    """
    for m in messages:
        token = control_token_in(tokenizer, m["content"])
        if token is not None:
            raise PipelineError(f"a {m['role']} message holds the control token {token!r} as text; it would become a "
                                f"real one in the chat template (text: {m['content'][:80]!r}…)")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
        ids = ids["input_ids"]
    return list(ids)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` in the tokenizer's chat template, generation prompt added.

    Returns:
        list of token ids, shape (prompt_tokens,), ending with the assistant turn's header.
    """
    return chat_token_ids(tokenizer, chat_messages(prompt), add_generation_prompt=True)
