"""Rollouts of online RL: sample with the current policy, score, and take per-token log-probs.

One rollout step samples ``sampling.num_responses`` responses per prompt from the policy being
trained with the project's seeded sampler (``generation.generate_transformers``: a seed per
response, recorded), scores them with the configured scorers (verifiable rewards or a learned
reward model, the missing-EOS penalty as in ``score``), and computes the per-token log-probs of
every response under the sampling policy and the reference policy. The result holds the tensors
the online objectives need (``advantages``, ``policy_gradient``) and writes itself as a Parquet
table (``schemas.ROLLOUTS``) so a run can be audited and replayed.

Per-token tensors are (responses, T): row i's response tokens at positions 0..len_i−1, then
padding, with ``mask`` 1.0 on the tokens (``advantages``' layout). Rows are sorted by
(prompt_id, response_idx), so a prompt's k responses are k consecutive rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.schemas import ROLLOUTS


def step_seed(seed: int, step: int) -> int:
    """The seed a rollout step passes to the sampler: 31 bits of SHA-256 of ``seed:rollout:step``,
    so each step draws fresh responses and a rerun draws the same ones."""
    digest = hashlib.sha256(f"{seed}:rollout:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


@dataclass
class Rollouts:
    """One step's responses, sorted by (prompt_id, response_idx), with what the objectives need."""

    step: int
    prompt_ids: list[str]
    response_idx: list[int]
    seeds: list[int]
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    scores: torch.Tensor        # (n,) the scorers' weighted sum
    rewards: torch.Tensor       # (n,) less the missing-EOS penalty
    logprobs: torch.Tensor      # (n, T) under the sampling policy πθ_old, nats
    ref_logprobs: torch.Tensor  # (n, T) under the reference policy, nats
    mask: torch.Tensor          # (n, T)

    @property
    def kl(self) -> torch.Tensor:
        """(n,) Σ_t (log πθ_old − log π_ref) per response, nats: an unbiased estimate of the sequence
        KL(πθ_old ‖ π_ref) (the responses are sampled from πθ_old)."""
        return ((self.logprobs - self.ref_logprobs) * self.mask).sum(1)

    def groups(self, values: torch.Tensor) -> torch.Tensor:
        """(n,) values as (prompts, k): a prompt's k responses in one row.

        Raises:
            PipelineError: the prompts do not all have the same number of responses.
        """
        counts = {pid: self.prompt_ids.count(pid) for pid in dict.fromkeys(self.prompt_ids)}
        if len(set(counts.values())) != 1:
            raise PipelineError(f"rollout step {self.step}: prompts have different numbers of responses {counts}")
        return values.reshape(len(counts), -1)

    def table(self) -> pa.Table:
        """The step's ``schemas.ROLLOUTS`` rows."""
        lengths = self.mask.sum(1).long().tolist()
        return pa.Table.from_pydict({
            "step": [self.step] * len(self.prompt_ids), "prompt_id": self.prompt_ids,
            "response_idx": self.response_idx, "seed": self.seeds, "response": self.texts,
            "token_ids": self.response_tokens, "finish_reason": self.finish_reasons,
            "score": self.scores.tolist(), "reward": self.rewards.tolist(),
            "logprobs": [row[:n] for row, n in zip(self.logprobs.tolist(), lengths)],
            "ref_logprobs": [row[:n] for row, n in zip(self.ref_logprobs.tolist(), lengths)],
            "kl": self.kl.tolist(),
        }, schema=ROLLOUTS)


def rollouts_from_table(table: pa.Table, prompt_tokens: dict[str, list[int]]) -> Rollouts:
    """The :class:`Rollouts` of one step's ``schemas.ROLLOUTS`` rows (as :meth:`Rollouts.table` wrote
    them; float32 log-probs and float64 rewards come back exactly): what a resumed online stage
    restores of the step it was killed in.

    Args:
        prompt_tokens: prompt_id -> the prompt's token ids (``chat.prompt_token_ids``).

    Raises:
        PipelineError: the rows span more than one step.
    """
    steps = set(table.column("step").to_pylist())
    if len(steps) != 1:
        raise PipelineError(f"rollouts: one step expected, got steps {sorted(steps)}")
    rows = table.to_pylist()
    width = max(len(r["token_ids"]) for r in rows)

    def padded(name):
        out = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            out[i, :len(r[name])] = torch.tensor(r[name], dtype=torch.float32)
        return out

    lengths = torch.tensor([len(r["token_ids"]) for r in rows])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return Rollouts(steps.pop(), [r["prompt_id"] for r in rows], [r["response_idx"] for r in rows],
                    [r["seed"] for r in rows], [r["response"] for r in rows], [r["finish_reason"] for r in rows],
                    [prompt_tokens[r["prompt_id"]] for r in rows], [r["token_ids"] for r in rows],
                    torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                    torch.tensor([r["reward"] for r in rows], dtype=torch.float64),
                    padded("logprobs"), padded("ref_logprobs"), mask)


def collect_rollouts(policy, reference, tokenizer, prompts: pa.Table, sampling, scorers, seed: int, step: int,
                     missing_eos_penalty: float | None, logprob_batch_size: int, progress: bool = False,
                     engine=None) -> Rollouts:
    """Sample, score and take the log-probs of one rollout step.

    Args:
        policy: the policy being trained (its current weights sample). reference: π_ref, or None
            (then ``ref_logprobs`` are zeros: objectives without a KL term).
        prompts: the step's prompts (``schemas.PROMPTS`` and whatever its scorers need).
        sampling: ``params.SamplingParams`` (num_responses, batch_size, max_new_tokens,
            temperature, top_p); log-probs are taken at its temperature.
        scorers: ``rewards.Scorers``, built once per stage.
        seed, step: the responses' seeds derive from both (:func:`step_seed`).
        missing_eos_penalty: subtracted from the reward of a response cut at ``max_new_tokens``.
        engine: an in-process vLLM engine (``online.backend: vllm``): the policy's weights are
            synced into it (``generation.sync_vllm_weights``) and it samples, with the same seeds
            and token rule; None: the stage's sampler on ``policy``.

    Raises:
        PipelineError: no prompts, a scorer lacking what it needs, a non-finite reward.
    """
    from rlhf_pipeline.chat import prompt_token_ids
    from rlhf_pipeline.generation import generate_transformers, generate_vllm, sync_vllm_weights
    from rlhf_pipeline.logprobs import batched_token_logprobs
    from rlhf_pipeline.rewards import penalize_missing_eos, score_responses

    if prompts.num_rows == 0:
        raise PipelineError(f"rollout step {step}: no prompts")
    texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    if engine is not None:
        sync_vllm_weights(engine, policy)
        responses = generate_vllm(None, tokenizer, sorted(texts.items()), sampling, step_seed(seed, step),
                                  sampling.dtype, llm=engine)
    else:
        was_training = policy.training
        policy.eval()
        responses = generate_transformers(policy, tokenizer, sorted(texts.items()), sampling, step_seed(seed, step),
                                          progress=progress)
        policy.train(was_training)
    responses.sort(key=lambda r: (r.prompt_id, r.response_idx))
    rows = [(r.prompt_id, r.response_idx, r.response) for r in responses]
    scored, _ = score_responses(rows, prompts, scorers, f"rollout step {step}", progress=progress)
    finish = [r.finish_reason for r in responses]
    scores = torch.tensor(scored.column("reward").to_pylist(), dtype=torch.float64)
    rewards = torch.tensor(penalize_missing_eos(scored, finish, missing_eos_penalty).column("reward").to_pylist(),
                           dtype=torch.float64)
    prompt_ids = {pid: prompt_token_ids(tokenizer, text) for pid, text in texts.items()}
    p_tokens = [prompt_ids[r.prompt_id] for r in responses]
    r_tokens = [r.token_ids for r in responses]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logprobs = batched_token_logprobs(policy, p_tokens, r_tokens, pad_id, sampling.temperature, logprob_batch_size)
    ref = (batched_token_logprobs(reference, p_tokens, r_tokens, pad_id, sampling.temperature, logprob_batch_size)
           if reference is not None else torch.zeros_like(logprobs))
    lengths = torch.tensor([len(t) for t in r_tokens])
    mask = (torch.arange(logprobs.shape[1])[None, :] < lengths[:, None]).float()
    return Rollouts(step, [r.prompt_id for r in responses], [r.response_idx for r in responses],
                    [r.seed for r in responses], [r.response for r in responses], finish, p_tokens, r_tokens,
                    scores, rewards, logprobs, ref, mask)
