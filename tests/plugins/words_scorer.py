"""A scorer from outside the package, as a user adds one (docs/extending.md): the number of words
of the response (whitespace-separated), capped at ``options.cap`` and divided by it, in [0, 1].

A toy: it shows the contract (``Params`` with ``name``, ``weight`` and ``options``; ``score`` gives
the ``reward_<name>`` column), not a reward worth training on. Listed in params.yaml's ``plugins``
and chosen with ``reward.scorers: [{name: response-words, weight: 0.5, options: {cap: 100}}]``;
tests/test_plugins.py checks that this file alone makes it a working scorer."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from rlhf_pipeline.params import Int, Section
from rlhf_pipeline.registry import SCORERS
from rlhf_pipeline.rewards import Scorer, ScorerParams, reward_column


class WordsOptions(Section):
    cap: Int = Field(100, gt=0, description="words at which the reward reaches 1")


@SCORERS.register
class ResponseWords(Scorer):
    """min(words, cap) / cap per response."""

    class Params(ScorerParams):
        """Response length in words, capped."""

        name: Literal["response-words"]
        options: WordsOptions = WordsOptions()

    def score(self, prompts, rows, progress=True):
        cap = self.cfg.options.cap
        values = [min(len(response.split()), cap) / cap for _, response in rows]
        return {reward_column(self.cfg.name): pa.array(values, pa.float64())}, {"cap": cap}
