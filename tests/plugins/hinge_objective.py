"""An objective from outside the package, as a user adds one (docs/extending.md): the hinge loss on
the log-ratio gap of SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, Eq. 1 with the reference's
log-ratio, as TRL's DPOTrainer ``loss_type="hinge"``): mean over pairs of
max(0, 1 − β·[(log πθ(y|x) − log π_ref(y|x)) − (log πθ(y'|x) − log π_ref(y'|x))]), nats.

Listed in params.yaml's ``plugins`` and chosen with ``train.objective: {name: hinge, beta: 0.1}``;
tests/test_plugins.py checks that this file alone makes it a working objective."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhf_pipeline.objectives import PairBatch, PairObjective, margin_figures
from rlhf_pipeline.params import Number, Section
from rlhf_pipeline.registry import OBJECTIVES


@OBJECTIVES.register
class Hinge(PairObjective):
    """SLiC-HF's hinge on β × the log-ratio gap. Logs the implicit reward margin and its accuracy."""

    class Params(Section):
        """Hinge (SLiC-HF): the margin is 1 on β × the log-ratio gap."""

        name: Literal["hinge"]
        beta: Number = Field(0.1, gt=0, description="β: scale of the log-ratio gap; the margin is 1/β nats")

    metric_names = ("reward_margin", "reward_accuracy")

    def loss(self, b: PairBatch):
        margin = self.cfg.beta * b.log_ratio_gap()
        return torch.relu(1.0 - margin).mean(), margin_figures(margin)
