"""Turning a prompt into the policy's chat-formatted input.

One place for it, because ``generate`` and ``pairs`` must tokenize a prompt identically: the
log-probs of training are only right if ``prompt_ids`` is exactly what the responses were sampled
after.
"""

from __future__ import annotations


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """A single-turn conversation with the prompt as the user's message."""
    return [{"role": "user", "content": prompt}]


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template.

    Returns:
        list of token ids, shape (tokens,).
    """
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
