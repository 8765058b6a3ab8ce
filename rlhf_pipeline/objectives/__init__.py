"""Objectives for the one training loop (``rlhf_pipeline.training``): the pairwise ones of
``train.objective`` (one file each in this package: ``rebel.py``, ``dpo.py``, ``ipo.py``,
``simpo.py``), SFT on demonstrations, and a Bradley–Terry reward model on preference pairs.

A pairwise objective is a :class:`PairObjective` subclass with its params model as ``Params``,
registered with ``@OBJECTIVES.register`` (``rlhf_pipeline.registry``); it turns a micro-batch's
sequence log-probs into a scalar loss and its named figures; the loss formulas themselves are the
pure functions of ``rlhf_pipeline.losses``. This module never imports a plugin: the registry imports
the chosen one (docs/extending.md). :class:`PairwiseTask` feeds them: it holds the
chosen/rejected pairs and their reference log-probs and computes the policy's log-probs of a
micro-batch. An objective on other data brings its own task (a ``training.TrainingTask``) and
reuses the loop: :class:`SftTask`, :class:`RewardModelTask`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.intervals import bootstrap_mean_ci
from rlhf_pipeline.logprobs import length_grouped_batches, sequence_logprobs
from rlhf_pipeline.losses import bradley_terry_loss, sft_loss
from rlhf_pipeline.registry import OBJECTIVES
from rlhf_pipeline.training import TrainingTask


class PairBatch(NamedTuple):
    """One micro-batch of pairs; every field (batch,) float32. Log-probs are summed over the
    response tokens (nats); ``*_tokens`` are response lengths (tokens)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def log_ratio_gap(self) -> torch.Tensor:
        """(batch,) (log πθ(y|x) − log π_ref(y|x)) − (log πθ(y'|x) − log π_ref(y'|x)), nats."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


class PairObjective:
    """A loss on :class:`PairBatch`. ``loss`` returns (scalar loss, {name: scalar}) with the names
    of :attr:`metric_names`, means over the micro-batch. A subclass defines ``Params`` (a
    ``params.Section`` with ``name: Literal['<name>']`` and its keys) and is registered with
    ``@OBJECTIVES.register``; ``cfg`` is its validated ``Params``."""

    Params: type
    metric_names: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, b: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def margin_figures(margin: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's rewards/margins and rewards/accuracies: the mean implicit reward gap ``margin`` (batch,)
    and the share of pairs where it is positive."""
    return {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}


def make_objective(cfg) -> PairObjective:
    """The objective chosen by ``train.objective`` (a ``params.ObjectiveChoice``, a mapping, or
    its plugin's validated ``Params``), its keys checked by the plugin (``registry.OBJECTIVES``).

    Raises:
        PipelineError: no objective of that name, or a bad key (named ``train.objective.<key>``).
    """
    return OBJECTIVES.build(cfg, "train.objective")


def check_reference(pairs: pa.Table, ref: pa.Table, where: str) -> None:
    """The reference log-probs must be those of these pairs, row for row.

    Raises:
        PipelineError: an empty pairs file, or reference rows that differ in count, ids or order.
    """
    if pairs.num_rows == 0:
        raise PipelineError(f"{where}: the pairs file has no rows")
    a, b = pairs.column("prompt_id").to_pylist(), ref.column("prompt_id").to_pylist()
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise PipelineError(f"{where}: reference log-probs do not match the pairs ({len(b)} vs {len(a)} rows, first "
                            f"difference at row {first}); rerun the ref_logprobs stage")


class PairwiseTask(TrainingTask):
    """Chosen/rejected pairs (token ids as sampled) and their reference log-probs, for a
    :class:`PairObjective`.

    Args:
        pairs: the pairs table (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``chosen_reward``,
            ``rejected_reward``). ref: the reference log-prob table, row for row.
        temperature: logits are divided by it for the log-probs (the sampling temperature).
        where: label of the inputs for error messages.

    Raises:
        PipelineError: see :func:`check_reference`.
    """

    def __init__(self, pairs: pa.Table, ref: pa.Table, objective: PairObjective, pad_id: int, temperature: float,
                 where: str):
        check_reference(pairs, ref, where)
        self.objective = objective
        self.name = objective.cfg.name
        self.limit_keys = "pairs.max_prompt_tokens / pairs.max_response_tokens"
        self.params_section = "train"
        self.pad_id, self.temperature = pad_id, temperature
        self.prompts, self.chosen, self.rejected = (pairs.column(c).to_pylist()
                                                    for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        def col(table, name):
            return torch.tensor(table.column(name).to_pylist(), dtype=torch.float32)

        self.reward_c, self.reward_r = col(pairs, "chosen_reward"), col(pairs, "rejected_reward")
        self.ref_c, self.ref_r = col(ref, "chosen_logprob"), col(ref, "rejected_logprob")
        #: per pair, the longer of its two sequences (tokens): for length grouping and the context check
        self.lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompts, self.chosen, self.rejected)]
        #: KL figures of every pairwise objective, then the objective's own
        self.metric_names = ("kl_chosen", "kl_rejected", *objective.metric_names)

    def loss_units(self, idx: list[int]) -> int:
        """Every pairwise objective is a mean over pairs (``losses``): the loop weighs a micro-batch by
        its pairs (``training.backward_minibatch``)."""
        return len(idx)

    def tokens(self, idx: list[int]) -> int:
        """Tokens one forward pass over these pairs processes (prompt twice, both responses)."""
        return sum(2 * len(self.prompts[i]) + len(self.chosen[i]) + len(self.rejected[i]) for i in idx)

    def forward(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective's loss on pairs ``idx`` and its figures as a (len(metric_names),) tensor
        without grad: kl_chosen and kl_rejected are mean log πθ − log π_ref of each side (nats)."""
        logps = sequence_logprobs(model, [self.prompts[i] for i in idx] * 2,
                                  [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx], self.pad_id,
                                  self.temperature)
        n = len(idx)
        device = logps.device

        def lengths(seqs):
            return torch.tensor([len(seqs[i]) for i in idx], dtype=torch.float32, device=device)

        b = PairBatch(logps[:n], logps[n:], self.ref_c[idx].to(device), self.ref_r[idx].to(device),
                      self.reward_c[idx].to(device), self.reward_r[idx].to(device),
                      lengths(self.chosen), lengths(self.rejected))
        loss, figures = self.objective.loss(b)
        with torch.no_grad():
            terms = [(b.policy_chosen - b.ref_chosen).mean(), (b.policy_rejected - b.ref_rejected).mean(),
                     *(figures[k] for k in self.objective.metric_names)]
            return loss, torch.stack([t.detach().float() for t in terms])


def _check_examples(first: list[list[int]], second: list[list[int]], names: tuple[str, str], what: str,
                    where: str) -> None:
    """Raise a PipelineError naming ``where``: no examples, or an example (row named) with no token
    on one of its two sides."""
    if not first:
        raise PipelineError(f"{where}: no {what}")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if not a or not b:
            raise PipelineError(f"{where}: row {i} has an empty {names[0] if not a else names[1]}")


class SftTask(TrainingTask):
    """Demonstrations (prompt and response token ids) for supervised fine-tuning: the loss is
    :func:`rlhf_pipeline.losses.sft_loss`, the negative log-likelihood per response token; prompt
    tokens are context only.

    Args:
        prompt_ids, response_ids: token ids per demonstration (``demonstrations.tokenize``).

    Raises:
        PipelineError: no demonstrations, or one with an empty prompt or response (row named).
    """

    name = "sft"
    limit_keys = "sft.max_tokens"
    params_section = "sft"
    #: figures logged beside the loss: none (the loss itself is the NLL per response token)
    metric_names: tuple[str, ...] = ()

    def __init__(self, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, where: str):
        _check_examples(prompt_ids, response_ids, ("prompt", "response"), "demonstrations", where)
        self.prompts, self.responses, self.pad_id = prompt_ids, response_ids, pad_id
        #: tokens per demonstration, prompt + response: for length grouping and the context check
        self.lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]

    def loss_units(self, idx: list[int]) -> int:
        """The SFT loss is a mean over response tokens: the loop weighs a micro-batch by its response
        tokens, so the update's loss is the NLL per token of the whole minibatch (as TRL's
        SFTTrainer with transformers' ``num_items_in_batch``), not a mean of per-micro-batch means."""
        return sum(len(self.responses[i]) for i in idx)

    def tokens(self, idx: list[int]) -> int:
        """Tokens one forward pass over these demonstrations processes."""
        return sum(self.lengths[i] for i in idx)

    def forward(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT loss on demonstrations ``idx`` (nats per response token) and an empty figures tensor."""
        logps = sequence_logprobs(model, [self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                                  self.pad_id, 1.0)
        n_tokens = torch.tensor([len(self.responses[i]) for i in idx], dtype=torch.float32, device=logps.device)
        return sft_loss(logps, n_tokens), torch.zeros(0)

    @torch.no_grad()
    def heldout_loss(self, model, batch_size: int) -> float:
        """The SFT loss over all these demonstrations at once (nats per response token, as
        :func:`rlhf_pipeline.losses.sft_loss` with every demonstration in one batch), computed in
        length-grouped no-grad batches of ``batch_size``; ``model`` in eval mode."""
        total, tokens = 0.0, 0
        for group in length_grouped_batches(self.lengths, batch_size):
            logps = sequence_logprobs(model, [self.prompts[i] for i in group], [self.responses[i] for i in group],
                                      self.pad_id, 1.0)
            total -= float(logps.double().sum())
            tokens += sum(len(self.responses[i]) for i in group)
        return total / tokens


def load_reward_model_for_training(model_dir, dtype: torch.dtype, device: torch.device, pad_id: int,
                                   quantization_config=None):
    """``AutoModelForSequenceClassification`` with one output from a policy folder: the policy's
    transformer and a new linear head on the last token (seeded by the caller's ``set_seed``), as
    InstructGPT's reward model starts from the SFT model (Ouyang et al. 2022, Sec. 3.5). The head
    pools the last non-pad token, so ``pad_token_id`` is set in the config. ``quantization_config``:
    QLoRA's 4-bit base (``lora.quantization_config``), placed on ``device`` as it loads."""
    from transformers import AutoModelForSequenceClassification

    if quantization_config is not None:
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=dtype, pad_token_id=pad_id, quantization_config=quantization_config,
            device_map={"": device})
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype,
                                                               pad_token_id=pad_id)
    return model.to(device)


class RewardModelTask(TrainingTask):
    """Preference pairs for a Bradley–Terry reward model (:func:`rlhf_pipeline.losses.bradley_terry_loss`):
    each side is the whole conversation's token ids; the model's one logit is the reward.

    Args:
        chosen_ids, rejected_ids: token ids per pair (``preferences.split_preferences``).
        margins: (pairs,) m of the loss. center_coefficient: ``reward_model.center_rewards_coefficient``.

    Raises:
        PipelineError: no pairs, or a pair with an empty side (row named).
    """

    name = "bradley_terry"
    limit_keys = "reward_model.max_tokens"
    params_section = "reward_model"
    #: peft's task type with LoRA: the new score head trains in full beside the factors
    peft_task_type = "SEQ_CLS"
    #: held-in figures per update: how often r(x, y) > r(x, y'), and the mean r(x, y) − r(x, y')
    metric_names = ("accuracy", "margin")

    def __init__(self, chosen_ids: list[list[int]], rejected_ids: list[list[int]], margins: list[float], pad_id: int,
                 center_coefficient: float | None, where: str):
        _check_examples(chosen_ids, rejected_ids, ("chosen", "rejected"), "preference pairs", where)
        self.chosen, self.rejected, self.pad_id = chosen_ids, rejected_ids, pad_id
        self.margins = torch.tensor(margins, dtype=torch.float32)
        self.center = center_coefficient
        #: per pair, the longer of its two sequences (tokens): for length grouping and the context check
        self.lengths = [max(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids)]

    def load_model(self, model_dir, dtype: torch.dtype, device: torch.device, quantization_config=None):
        return load_reward_model_for_training(model_dir, dtype, device, self.pad_id, quantization_config)

    def loss_units(self, idx: list[int]) -> int:
        """The Bradley–Terry loss (and its centring term) is a mean over pairs."""
        return len(idx)

    def tokens(self, idx: list[int]) -> int:
        """Tokens one forward pass over these pairs processes (both sides)."""
        return sum(len(self.chosen[i]) + len(self.rejected[i]) for i in idx)

    def rewards(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards of pairs ``idx``, each (len(idx),): both sides in one
        right-padded batch, the head reading each sequence's last token."""
        seqs = [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx]
        device = next(model.parameters()).device
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
        return scores[:len(idx)], scores[len(idx):]

    def forward(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bradley–Terry loss on pairs ``idx`` and (accuracy, margin) without grad."""
        chosen, rejected = self.rewards(model, idx)
        loss = bradley_terry_loss(chosen, rejected, self.margins[idx].to(chosen.device), self.center)
        with torch.no_grad():
            gap = chosen - rejected
            return loss, torch.stack([(gap > 0).float().mean(), gap.mean()]).detach()

    @torch.no_grad()
    def heldout_metrics(self, model, batch_size: int, bootstrap_samples: int, bins: int, seed: int) -> dict:
        """Pairwise accuracy (ties count half) with a 95 % percentile-bootstrap interval over pairs,
        the Bradley–Terry loss (nats per pair), the mean reward gap r(x, y) − r(x, y'), and the
        accuracy in ``bins`` equal-count bins of |r(x, y) − r(x, y')| (calibration: a reward model
        whose confident gaps are right more often than its small ones)."""
        chosen, rejected = torch.zeros(len(self.lengths)), torch.zeros(len(self.lengths))
        for group in length_grouped_batches(self.lengths, batch_size):
            c, r = self.rewards(model, group)
            chosen[group], rejected[group] = c.cpu(), r.cpu()
        gap = (chosen - rejected).double().numpy()
        correct = np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0))
        low, high = bootstrap_mean_ci(correct, bootstrap_samples, 0.95, seed)
        order = np.argsort(np.abs(gap), kind="stable")
        calibration = [{"abs_gap_min": round(float(np.abs(gap[part]).min()), 6),
                        "abs_gap_max": round(float(np.abs(gap[part]).max()), 6), "pairs": int(part.size),
                        "accuracy": round(float(correct[part].mean()), 6)}
                       for part in np.array_split(order, min(bins, gap.size))]
        return {"pairs": int(gap.size), "accuracy": round(float(correct.mean()), 6),
                "accuracy_ci": [round(low, 6), round(high, 6)], "above_chance": bool(low > 0.5),
                "loss": round(float(bradley_terry_loss(chosen, rejected, self.margins, self.center)), 6),
                "mean_reward_gap": round(float(gap.mean()), 6),
                "mean_reward_chosen": round(float(chosen.mean()), 6),
                "mean_reward_rejected": round(float(rejected.mean()), 6), "calibration": calibration}
