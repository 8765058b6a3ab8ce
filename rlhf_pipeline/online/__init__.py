"""Online RL on the one training loop: PPO, RLOO, GRPO and online REBEL as objectives of one task.

:class:`OnlineTask` is a task of ``training.train_policy`` whose examples are the current rollout
step's responses (pairs of them for REBEL). Before an update that starts a rollout step it samples
the current policy (``rollouts.collect_rollouts``: seeded sampler, scorers, missing-EOS penalty,
per-token log-probs under the policy and π_ref) and lets its objective prepare advantages; the loop
then runs ``num_ppo_epochs`` passes over the step's examples in minibatches (one minibatch = one
update), so ``updates per step = num_ppo_epochs × examples per step / minibatch``. The loop saves
the task's :meth:`OnlineTask.state_dict` (step, KL controller, every step's rollouts, the critic's
values) in its checkpoint, so a killed run resumes to the same weights.

The objectives share rollouts and differ in what they make of them (``online.algorithms.<key>.name``;
one file each in this package, registered in ``registry.ONLINE_ALGORITHMS`` and imported only
when chosen):

- ``ppo``: per-token KL-penalised reward (``advantages.kl_penalized_rewards``), GAE, whitening, the
  clipped surrogate and clipped value loss (``policy_gradient``), fixed or adaptive β (``kl_control``).
  The value model is a separate critic: the policy's transformer with a new scalar head
  (``AutoModelForTokenClassification``, one label), trained beside the policy by the same optimizer
  (:class:`PolicyAndValue`). Separate rather than a value head on the policy's trunk, as TRL's and
  OpenRLHF's PPO: the value loss's gradients then never move the policy. It costs a second
  forward and backward pass per minibatch.
- ``rloo``: the leave-one-out baseline over a prompt's k responses of the score less β·KL, one
  advantage and one clipped ratio per response (summed log-probs), averaged over responses (as TRL's
  RLOOTrainer).
- ``grpo``: group-normalised advantages of the score, clipped ratio, k3 KL to π_ref in the loss.
- ``rebel``: a prompt's responses in consecutive pairs, the REBEL regression (``losses.rebel_loss``)
  with the sampling policy πθ_old as π_t and the score less β·KL(πθ_old ‖ π_ref) as the reward.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pyarrow as pa
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.kl_control import FixedKLController
from rlhf_pipeline.logprobs import length_grouped_batches, token_logprobs_and_values
from rlhf_pipeline.rollouts import Rollouts, collect_rollouts, rollouts_from_table
from rlhf_pipeline.schemas import ROLLOUTS
from rlhf_pipeline.training import TrainingTask


class PolicyAndValue(torch.nn.Module):
    """The policy and its critic as one module, so one optimizer, one accelerate ``prepare`` (DDP)
    and one checkpoint hold both. Its forward pass runs both on the same tokens: the policy's output
    with ``values`` (batch, kept positions), V at each position (``logprobs.token_logprobs_and_values``)."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    @property
    def config(self):
        return self.policy.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)
        self.value_model.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        values = self.value_model(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0]
        return SimpleNamespace(logits=out.logits, values=values[:, -logits_to_keep:] if logits_to_keep else values)


def load_value_model(model_dir, dtype: torch.dtype, device: torch.device):
    """The critic: the policy folder's transformer with a new one-output linear head per position
    (``AutoModelForTokenClassification``), the head zeroed.

    Zero, not random: a random head over hidden states of norm ~√d gives values of the order of the
    rewards themselves, pure noise that GAE turns into advantages (on the test's tiny policy PPO
    then unlearned its reward: tests/test_online.py); V = 0 starts PPO from the plain returns and
    the critic learns from there.
    """
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    head = model.score if hasattr(model, "score") else model.classifier
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return model.to(device)


class OnlineObjective:
    """What an online algorithm makes of a rollout step; a plugin (one file in this package) defines
    ``Params`` (``name: Literal['<name>']`` and its keys) and is registered with
    ``@ONLINE_ALGORITHMS.register``; ``cfg`` is its validated ``Params``. Examples are responses
    (``responses_per_example`` 1) or consecutive pairs of them (2). ``prepare`` turns the rollouts
    into the tensors the loss reads (advantages …); ``loss`` returns (scalar loss, figures named
    :attr:`metric_names`, detached)."""

    Params: type
    metric_names: tuple[str, ...] = ()
    responses_per_example = 1
    needs_value_model = False

    def __init__(self, cfg):
        self.cfg = cfg

    def check_setting(self, online, key: str) -> None:
        """Refuse a combination of this algorithm's keys with the ``online`` section's (a
        ``params.OnlineParams``; ``key``: this algorithm's key in ``online.algorithms``) before any
        rollout; none by default.

        Raises:
            PipelineError: naming the keys.
        """

    def kl_controller(self):
        return FixedKLController(self.cfg.kl_coef)

    def examples_per_step(self, online) -> int:
        """Examples of one rollout step under ``params.OnlineParams`` ``online``: its responses, or
        the pairs of them."""
        return online.prompts_per_step * online.num_responses // self.responses_per_example

    def lengths(self, r: Rollouts) -> list[int]:
        """Tokens per example (prompt + response): for length grouping."""
        return [len(p) + len(t) for p, t in zip(r.prompt_tokens, r.response_tokens)]

    def loss_units(self, r: Rollouts, idx: list[int]) -> int:
        """What :meth:`loss` is a mean over, for examples ``idx``: examples (responses or pairs) by
        default; response tokens for a token-mean loss (PPO). The loop weighs micro-batches by it
        (``training.backward_minibatch``)."""
        return len(idx)

    def tokens(self, r: Rollouts, idx: list[int]) -> int:
        """Tokens one forward pass over examples ``idx`` processes."""
        return sum(len(r.prompt_tokens[i]) + len(r.response_tokens[i]) for i in idx)

    def prepare(self, r: Rollouts, values: torch.Tensor | None, beta: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, r: Rollouts, prep: dict, idx: list[int], pad_id: int,
             temperature: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


def rows(r: Rollouts, idx: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    return [r.prompt_tokens[i] for i in idx], [r.response_tokens[i] for i in idx]


def sequence_reward(r: Rollouts, beta: float) -> torch.Tensor:
    """(n,) the reward less β times the sequence KL(πθ_old ‖ π_ref) estimate (nats): RLOO's and the
    REBEL reference's KL-regularised reward (Ahmadian et al. 2024, Sec. 2; Gao et al. 2024, Sec. 5)."""
    return (r.rewards - beta * r.kl.double()).float()


#: Figures of the current rollout step, logged beside each update's loss: mean reward (the penalty
#: included) and score, mean sequence KL(πθ_old ‖ π_ref) (nats), per-token entropy of πθ_old estimated
#: by −mean log πθ_old of the sampled tokens (nats), mean response tokens, share cut at
#: max_new_tokens, and β.
ROLLOUT_METRICS = ("reward", "score", "kl", "entropy", "response_length", "truncated", "beta")


def step_prompt_order(num_prompts: int, steps: int, per_step: int, seed: int) -> list[list[int]]:
    """Prompt rows of each rollout step: consecutive chunks of ``per_step`` from seeded permutations
    of the prompts, one per epoch, concatenated (``training.episode_order``), except that a prompt
    already in the step being filled (where two permutations meet) is held back for the next step.
    A step then never samples one prompt twice, which would make the step short (its responses are
    keyed by prompt) and double that prompt's weight. When ``per_step`` divides the prompts, or the
    steps stay within one permutation, the chunks are exactly the permutations' slices.

    Raises:
        PipelineError: ``per_step`` larger than ``num_prompts``.
    """
    from rlhf_pipeline.training import episode_order

    if per_step > num_prompts:
        raise PipelineError(f"online.prompts_per_step: {per_step} prompts per step, but there are {num_prompts}")
    stream = iter(episode_order(num_prompts, (steps + 1) * per_step + num_prompts, seed))
    held: list[int] = []
    order = []
    for _ in range(steps):
        chunk: list[int] = []
        candidates, held = held, []
        while len(chunk) < per_step:
            row = candidates.pop(0) if candidates else next(stream)
            (held if row in chunk else chunk).append(row)
        held.extend(candidates)
        order.append(chunk)
    return order


class OnlineTask(TrainingTask):
    """Rollout steps on ``prompts`` for an :class:`OnlineObjective`, as a task of the one loop.

    Args:
        objective: the chosen plugin (``registry.ONLINE_ALGORITHMS``). prompts: the train prompts (``schemas.PROMPTS``
            and what the scorers need). reference: π_ref (eval mode, no grad). scorers:
            ``rewards.Scorers``. cfg: ``params.OnlineParams``. missing_eos_penalty: ``reward``'s.
        engine: for ``online.backend: vllm``, an in-process vLLM engine on the starting policy
            (``generation.vllm_engine(..., in_process=True)``); every rollout step syncs the
            current weights into it first, so a resumed run samples as an uninterrupted one.

    Raises:
        PipelineError: fewer prompts than one step needs.
    """

    params_section = "online"
    limit_keys = "online.max_new_tokens"

    def __init__(self, objective: OnlineObjective, prompts: pa.Table, tokenizer, reference, scorers, cfg,
                 missing_eos_penalty: float | None, seed: int, where: str, progress: bool = False, engine=None):
        from rlhf_pipeline.chat import prompt_token_ids
        from rlhf_pipeline.params import SamplingParams

        if prompts.num_rows < cfg.prompts_per_step:
            raise PipelineError(f"online.prompts_per_step: {cfg.prompts_per_step} prompts per step, but {where} has "
                                f"{prompts.num_rows}")
        self.objective, self.cfg, self.seed, self.progress, self.engine = objective, cfg, seed, progress, engine
        self.name = objective.cfg.name
        self.metric_names = (*ROLLOUT_METRICS, *objective.metric_names)
        self.prompts = prompts.sort_by("prompt_id")
        self.tokenizer, self.reference, self.scorers = tokenizer, reference, scorers
        self.missing_eos_penalty = missing_eos_penalty
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt_tokens = {pid: prompt_token_ids(tokenizer, text) for pid, text in
                              zip(self.prompts.column("prompt_id").to_pylist(), self.prompts.column("prompt").to_pylist())}
        self.sampling = SamplingParams(num_responses=cfg.num_responses, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       batch_size=cfg.generation_batch_size, dtype=cfg.dtype)
        self.examples_per_step = objective.examples_per_step(cfg)
        #: per rollout step, its prompts' rows: chunk s of seeded permutations of the prompts, no prompt twice
        self.step_prompts = step_prompt_order(self.prompts.num_rows, cfg.rollout_steps, cfg.prompts_per_step, seed)
        # Until the first rollout, every example is as long as the longest prompt + max_new_tokens:
        # the loop's context check sees the bound before any sampling.
        self.lengths = [max(map(len, self.prompt_tokens.values())) + cfg.max_new_tokens] * self.examples_per_step
        self.kl_controller = objective.kl_controller()
        self.tables: list[pa.Table] = []
        self.rollouts: Rollouts | None = None
        self.values: torch.Tensor | None = None
        self.rollout_seconds = 0.0

    @property
    def episodes_per_step(self) -> int:
        """Examples the loop draws per rollout step: ``num_ppo_epochs`` passes over its examples."""
        return self.cfg.num_ppo_epochs * self.examples_per_step

    def total_episodes(self) -> int:
        return self.cfg.rollout_steps * self.episodes_per_step

    def load_model(self, model_dir, dtype: torch.dtype, device: torch.device, quantization_config=None):
        """The policy, and for PPO the policy with its critic (:class:`PolicyAndValue`)."""
        from rlhf_pipeline.models import load_policy

        policy = load_policy(model_dir, dtype, device)
        if not self.objective.needs_value_model:
            return policy
        return PolicyAndValue(policy, load_value_model(model_dir, dtype, device))

    def policy_of(self, module):
        """The policy inside what :meth:`load_model` returned (what is sampled and saved)."""
        return module.policy if isinstance(module, PolicyAndValue) else module

    def policy_weights(self, state_dict: dict) -> dict:
        """The policy's tensors of the trained module's state dict (the critic is not saved)."""
        if not self.objective.needs_value_model:
            return state_dict
        return {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}

    def before_update(self, model, episodes: int) -> None:
        """Collect rollout step ``episodes // episodes_per_step`` when the loop has used up the
        previous one (``model``: the unwrapped module being trained)."""
        if episodes % self.episodes_per_step:
            return
        step = episodes // self.episodes_per_step
        t0 = time.perf_counter()
        chunk = self.step_prompts[step]
        r = collect_rollouts(self.policy_of(model), self.reference, self.tokenizer, self.prompts.take(sorted(chunk)),
                             self.sampling, self.scorers, self.seed, step, self.missing_eos_penalty,
                             self.cfg.logprob_batch_size, progress=self.progress, engine=self.engine)
        values = self._values(model, r) if self.objective.needs_value_model else None
        self._set_step(r, values, self.kl_controller.beta)
        self.kl_controller.update(float(r.kl.mean()), len(r.prompt_ids))
        self.tables.append(r.table())
        self.rollout_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _values(self, model: PolicyAndValue, r: Rollouts) -> torch.Tensor:
        """(n, T) the critic's V(s_t) at every response token of the step, at rollout time."""
        out = torch.zeros_like(r.logprobs)
        lengths = [len(p) + len(t) for p, t in zip(r.prompt_tokens, r.response_tokens)]
        for idx in length_grouped_batches(lengths, self.cfg.logprob_batch_size):
            _, values, mask = token_logprobs_and_values(model, *rows(r, idx), self.pad_id, self.cfg.temperature)
            out[idx, :mask.shape[1]] = values.float().cpu()
        return out

    def _set_step(self, r: Rollouts, values: torch.Tensor | None, beta: float) -> None:
        self.rollouts, self.values, self.beta = r, values, beta
        self.prepared = self.objective.prepare(r, values, beta)
        self.lengths = self.objective.lengths(r)
        tokens = r.mask.sum()
        self.step_figures = torch.tensor([
            float(r.rewards.mean()), float(r.scores.mean()), float(r.kl.mean()),
            float(-(r.logprobs * r.mask).sum() / tokens), float(tokens) / len(r.prompt_ids),
            sum(f == "length" for f in r.finish_reasons) / len(r.prompt_ids), beta])

    def tokens(self, idx: list[int]) -> int:
        return self.objective.tokens(self.rollouts, idx)

    def loss_units(self, idx: list[int]) -> int:
        return self.objective.loss_units(self.rollouts, idx)

    def forward(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective's loss on examples ``idx`` of the current step, and (step figures,
        objective figures) as one detached (len(metric_names),) tensor."""
        loss, figures = self.objective.loss(model, self.rollouts, self.prepared, idx, self.pad_id,
                                            self.cfg.temperature)
        return loss, torch.cat([self.step_figures, torch.stack([f.detach().float().cpu() for f in figures])])

    def rollouts_table(self) -> pa.Table:
        """Every step's rollouts so far (``schemas.ROLLOUTS``), in step order."""
        return pa.concat_tables(self.tables) if self.tables else ROLLOUTS.empty_table()

    def summary(self) -> dict:
        """Facts for the metrics file: the budget spent (responses, generated tokens) and the time in
        rollouts (sampling, scoring, log-probs), seconds."""
        table = self.rollouts_table()
        return {"rollout_steps": len(self.tables), "responses_generated": table.num_rows,
                "tokens_generated": sum(len(t) for t in table.column("token_ids").to_pylist()),
                "rollout_seconds": round(self.rollout_seconds, 3)}

    def state_dict(self) -> dict:
        """JSON-able state for the loop's checkpoint: KL controller, every step's rollouts, the
        current step's β and critic values (floats round-trip exactly through JSON)."""
        return {"kl_controller": self.kl_controller.state_dict(), "beta": self.beta,
                "tables": [t.to_pylist() for t in self.tables], "rollout_seconds": self.rollout_seconds,
                "values": None if self.values is None else self.values.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state: the current step's prepared tensors are recomputed
        from its rollouts, values and β, as they were."""
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.tables = [pa.Table.from_pylist(rows, schema=ROLLOUTS) for rows in state["tables"]]
        self.rollout_seconds = state["rollout_seconds"]
        values = None if state["values"] is None else torch.tensor(state["values"], dtype=torch.float32)
        if self.tables:
            self._set_step(rollouts_from_table(self.tables[-1], self.prompt_tokens), values, state["beta"])
