"""Reward-model scorer: ``AutoModelForSequenceClassification`` on the (prompt, response) chat.

Covers Bradley–Terry reward models with one logit (Skywork-Reward, FsfairX) and ArmoRM
(``RLHFlow/ArmoRM-Llama3-8B-v0.1``, ``trust_remote_code: true``, ``score_attribute: score``), the
seed recipe's reward model. The conversation is formatted with the reward model's own chat
template; conversations are batched by length, bf16 where the device computes it natively.
"""

from __future__ import annotations

import logging
from typing import Literal

import pyarrow as pa
import torch
from pydantic import Field
from tqdm.auto import tqdm

from rlhf_pipeline.chat import chat_messages, chat_token_ids
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import Bool, Dtype, Int, Section
from rlhf_pipeline.registry import SCORERS
from rlhf_pipeline.rewards import Scorer, ScorerParams

log = logging.getLogger(__name__)


class SequenceClassificationOptions(Section):
    """A reward model loaded with ``AutoModelForSequenceClassification``."""

    model: str = Field(..., min_length=1, description="Hub id or local folder, e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1")
    revision: str | None = None
    trust_remote_code: Bool = False
    score_attribute: str | None = Field(
        None, description="output attribute holding the reward (ArmoRM: 'score'); default: the one logit")
    batch_size: Int = Field(8, gt=0, description="conversations per forward pass")
    max_length: Int = Field(4096, gt=0, description="tokens; longer conversations are truncated (counted)")
    dtype: Dtype = "auto"


def load_reward_model(opts: SequenceClassificationOptions, device: torch.device):
    """(model, tokenizer) of a reward model, in eval mode on ``device``.

    Raises:
        PipelineError: the model cannot be loaded, has no chat template, or (without
            ``score_attribute``) has more than one output logit.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.models import resolve_dtype

    key = "reward.scorers[sequence-classification].options.model"
    kw = dict(revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(opts.model, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(
            opts.model, dtype=resolve_dtype(opts.dtype, device), **kw)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{key}: cannot load {opts.model!r}: {exc}") from None
    if not tok.chat_template:
        raise PipelineError(f"{key}: {opts.model!r} has no chat template to format the conversation")
    if opts.score_attribute is None and getattr(model.config, "num_labels", 1) != 1:
        raise PipelineError(f"{key}: {opts.model!r} has {model.config.num_labels} labels; a reward model has one "
                            "(or set score_attribute)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad position
    return model.to(device).eval(), tok


def conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of the two-turn conversation in the reward model's chat template (as the
    ``reward_model`` stage trains on them: ``preferences.tokenize_pairs``)."""
    return chat_token_ids(tokenizer, [*chat_messages(prompt), {"role": "assistant", "content": response}])


@SCORERS.register
class SequenceClassification(Scorer):
    """The ``sequence-classification`` scorer: a reward model's scalar for the (prompt, response)
    conversation (nothing needed beyond ``prompt``). The model is loaded on the first :meth:`score`
    and kept for the stage's later calls."""

    class Params(ScorerParams):
        """A reward model's scalar output for the (prompt, response) conversation."""

        name: Literal["sequence-classification"]
        options: SequenceClassificationOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts: SequenceClassificationOptions = cfg.options
        self._loaded = None

    def score(self, prompts: dict[str, dict], rows: list[tuple[str, str]], progress: bool = True
              ) -> tuple[dict[str, pa.Array], dict]:
        """See :func:`score`; facts: ``truncated`` conversations."""
        from rlhf_pipeline.models import default_device

        if self._loaded is None:
            device = default_device()
            self._loaded = (*load_reward_model(self.opts, device), device)
        return score(prompts, rows, self.opts, *self._loaded, progress=progress)


@torch.no_grad()
def score(prompts: dict[str, dict], rows: list[tuple[str, str]], opts: SequenceClassificationOptions, model, tok,
          device: torch.device, progress: bool = True) -> tuple[dict[str, pa.Array], dict]:
    """The reward model's scalar for each (prompt_id, response) row, conversations batched by length.

    Returns:
        ({"reward_sequence_classification": float64 array aligned with rows},
         {"truncated": conversations cut at options.max_length}).
    """
    encoded = [conversation_ids(tok, prompts[pid]["prompt"], resp) for pid, resp in rows]
    truncated = sum(len(e) > opts.max_length for e in encoded)
    encoded = [e[: opts.max_length] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    out = [0.0] * len(rows)
    for start in tqdm(range(0, len(order), opts.batch_size), desc="score", disable=not progress):
        idx = order[start:start + opts.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # right padding: the classifier pools the last real token
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        result = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        values = getattr(result, opts.score_attribute) if opts.score_attribute else result.logits
        for row, i in enumerate(idx):
            out[i] = float(values[row].reshape(-1)[0].float())
    if truncated:
        log.warning("%d conversations longer than %d tokens were truncated", truncated, opts.max_length)
    return {"reward_sequence_classification": pa.array(out, pa.float64())}, {"truncated": truncated}
