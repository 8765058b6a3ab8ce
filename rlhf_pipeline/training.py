"""The one training loop (REBEL recipe, part 4), driven by a task and its objective.

A task (``rlhf_pipeline.objectives.PairwiseTask`` for REBEL, DPO, IPO and SimPO, ``SftTask`` for
supervised fine-tuning) knows its examples' lengths, its figures' names, and how to compute a
micro-batch's loss; everything else is here and shared: accelerator, optimizer, schedule, accumulation, clipping, resumable checkpoints, atomic
save, the per-update log. Optimisation follows
the REBEL reference: AdamW (β1 0.9, β2 0.95, eps 1e-8, weight decay 1e-6), cosine schedule with
warm-up, gradient clipping, ``batch size = per_device_train_batch_size × gradient_accumulation_steps
× world_size`` pairs per update, ``num_updates = total_episodes // batch size``.

accelerate runs the same code as one CPU process or under ``accelerate launch`` (DDP, or DeepSpeed
ZeRO-3 with the config in ``envs/accelerate/``). Gradient accumulation is accelerate's own
(``Accelerator(gradient_accumulation_steps=…)``, ``accumulate()``, ``sync_gradients``): it skips
the DDP all-reduce on all but the last micro-batch, divides the loss once (DeepSpeed divides it
itself and steps its engine only at the boundary), and clipping at ``max_grad_norm`` is applied
once per update (by accelerate, or by DeepSpeed's ``gradient_clipping``).

With ``cfg.lora`` the model is frozen and wrapped with LoRA factors (``rlhf_pipeline.lora``, peft)
after its own dropout is turned off, so the LoRA dropout stays as configured; the saved folder
holds the merged weights and, under ``adapter/``, the adapter.

Resumable state: model (safetensors), optimizer and RNG through accelerate (read back with
``torch.load(weights_only=True)``, which cannot run code), and the scheduler, update count and
log rows as JSON (``progress.json``). The episode order is a pure function of the seed, so the
update count is all the data position needed.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import check_context_length, length_grouped_batches
from rlhf_pipeline.params import OptimizerParams

log = logging.getLogger(__name__)



class TrainingTask(Protocol):
    """What :func:`train_policy` needs of a task: the contract of the one loop, with defaults.

    A task subclasses this (``objectives.PairwiseTask``, ``SftTask``, ``RewardModelTask``,
    ``online.OnlineTask``) and sets or overrides what differs from the defaults; the loop calls every
    member, never ``getattr``/``hasattr``.

    Attributes:
        name: the objective's name in logs and the summary (``dpo``, ``sft`` …).
        params_section: the params section its settings come from (``train``, ``sft`` …), for errors.
        limit_keys: the params keys that bound its sequence lengths, for the context-length error.
        lengths: (examples,) tokens of each example's longest sequence: length grouping and the
            context check.
        metric_names: its figures, in the order :meth:`forward` returns them.
        peft_task_type: peft's task type with LoRA (``SEQ_CLS`` keeps a new score head trainable).
    """

    name: str
    params_section: str
    limit_keys: str
    lengths: list[int]
    metric_names: tuple[str, ...]
    peft_task_type: str = "CAUSAL_LM"

    def loss_units(self, idx: list[int]) -> int:
        """Units the loss of examples ``idx`` is a mean over (tokens, sequences or pairs): the
        minibatch weighting of :func:`backward_minibatch`."""
        ...

    def tokens(self, idx: list[int]) -> int:
        """Tokens one forward pass over examples ``idx`` processes (for tokens/s)."""
        ...

    def forward(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss with grad, (len(metric_names),) figures without grad) on examples ``idx``."""
        ...

    def load_model(self, model_dir, dtype: torch.dtype, device: torch.device, quantization_config=None):
        """The module to train; default: the causal LM policy in ``model_dir``."""
        from rlhf_pipeline.models import load_policy

        return load_policy(model_dir, dtype, device, quantization_config=quantization_config)

    def before_update(self, model, episodes: int) -> None:
        """Called before each update with the module being trained (unwrapped) and the episodes
        seen so far (online RL collects a rollout step here); default: nothing."""

    def state_dict(self) -> dict | None:
        """JSON-able state the checkpoint keeps beside the model's (online RL: its rollouts);
        default: none."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state on a resume; default: nothing to restore."""

    def policy_of(self, module):
        """The policy inside the trained module (what is evaluated and saved); default: the module."""
        return module

    def policy_weights(self, state_dict: dict) -> dict:
        """The policy's tensors of the trained module's state dict; default: all of them."""
        return state_dict


def train_log_columns(task) -> tuple[str, ...]:
    """Columns of the per-update log: the loop's own around the task's figures."""
    return ("update", "episodes", "loss", "learning_rate", "grad_norm", *task.metric_names, "tokens_per_second",
            "seconds")


def deepspeed_on_cpu() -> bool:
    """Whether this process was launched for DeepSpeed (``accelerate launch`` with a DeepSpeed config
    sets ``ACCELERATE_USE_DEEPSPEED``) on a machine without CUDA."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available()


def use_cpu() -> bool:
    """accelerate's ``cpu`` flag: True without a CUDA device, except under DeepSpeed. Every accelerate
    state of the process must be created with this same flag (:func:`state_options`): a
    ``PartialState()`` made first without it pins a one-process state under ``accelerate launch``.

    accelerate 1.15 never uses DeepSpeed with ``cpu=True`` (``AcceleratorState`` checks ``not cpu``),
    and with ``cpu=False`` on a machine without an accelerator it finds no process-group backend and
    reports one process even though DeepSpeed has joined all of them (``num_processes == 1``):
    :func:`state_options` names the backend, gloo, for that case."""
    return not torch.cuda.is_available() and not deepspeed_on_cpu()


def state_options() -> dict:
    """Keyword arguments of every ``PartialState``/``Accelerator`` state of the process: ``cpu``
    (:func:`use_cpu`) and, for DeepSpeed on CPU, the gloo process group (DeepSpeed's CPU
    accelerator, ``DS_ACCELERATOR=cpu``, communicates over it)."""
    return {"cpu": use_cpu(), **({"backend": "gloo"} if deepspeed_on_cpu() else {})}


def make_accelerator(**kwargs):
    """The process's ``accelerate.Accelerator`` with :func:`state_options` (``kwargs``: the rest)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    options = state_options()
    handlers = [InitProcessGroupKwargs(backend=options["backend"])] if "backend" in options else []
    return Accelerator(cpu=options["cpu"], kwargs_handlers=handlers, **kwargs)


def process_state():
    """The process's ``accelerate.PartialState`` (rank, world size), made with :func:`state_options`."""
    from accelerate import PartialState

    return PartialState(**state_options())


def is_main_process() -> bool:
    """Whether this is the process that writes outputs (rank 0 under ``accelerate launch``)."""
    return process_state().is_main_process


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, epoch]).permutation(num_examples).tolist())


def episode_slice(num_examples: int, seed: int, start: int, stop: int) -> list[int]:
    """``episode_order(num_examples, stop, seed)[start:stop]``, computing only the epochs it touches:
    the loop takes one update's slice at a time, so ``total_episodes`` of 10^9 costs nothing up
    front (the whole order took minutes and gigabytes before the first update)."""
    out: list[int] = []
    i = start
    while i < stop:
        epoch, pos = divmod(i, num_examples)
        take = min(stop - i, num_examples - pos)
        out.extend(_epoch_permutation(num_examples, seed, epoch)[pos:pos + take])
        i += take
    return out


def episode_order(num_pairs: int, total_episodes: int, seed: int) -> list[int]:
    """Pair indices in training order: a seeded permutation per epoch, concatenated, cut at
    ``total_episodes``."""
    return episode_slice(num_pairs, seed, 0, total_episodes)


#: Folders whose Python files are the training stages' code: the package and the stage scripts.
CODE_ROOTS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "stages")


def code_digest(roots: tuple[Path, ...] | None = None) -> str:
    """SHA-256 of every ``.py`` file under ``roots`` (default :data:`CODE_ROOTS`), by path and content,
    and of the versions of the libraries whose arithmetic training uses (torch, transformers,
    accelerate, peft).

    The whole package rather than one stage's import closure: a checkpoint is cheap to redo and
    a missed dependency would resume under other code; a resumed run must equal an uninterrupted one.
    """
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for root in CODE_ROOTS if roots is None else roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f"{f.relative_to(root.parent)}\0".encode())
            h.update(f.read_bytes())
    for lib in ("torch", "transformers", "accelerate", "peft"):
        try:
            h.update(f"{lib}=={version(lib)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{lib} absent\0".encode())
    return h.hexdigest()


def inputs_fingerprint(files: list[Path], cfg: OptimizerParams, seed: int, temperature: float,
                       data: bytes = b"") -> str:
    """SHA-256 of the training inputs and settings; a checkpoint is resumed only if it matches.

    The settings are the keys the stage declares in dvc.yaml (not ``logprob_batch_size``, read by
    ``ref_logprobs`` only, nor ``mlflow_live`` or the held-out evaluation's keys, which change no
    weight) and the log-prob temperature they resolve to, and the code (:func:`code_digest`): a run
    killed before an edit of the loss must not resume under the edited one. ``data``: inputs that
    are not files (the tokenized demonstrations of ``sft``, the pairs of ``reward_model``).
    """
    settings = cfg.model_dump(exclude={"mlflow_live", "logprob_batch_size", "allow_temperature_mismatch",
                                       "reference",  # the reference is in the log-prob file
                                       "per_device_eval_batch_size", "bootstrap_samples", "calibration_bins"})
    h = hashlib.sha256(json.dumps({"train": settings, "seed": seed, "temperature": temperature},
                                  sort_keys=True).encode())
    h.update(code_digest().encode())
    h.update(data)
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


PROGRESS_FILE = "progress.json"


def _save_checkpoint(accelerator, incoming: Path, latest: Path, fingerprint: str, progress: dict) -> None:
    """Save model, optimizer and RNG (accelerate) and ``progress`` (JSON) to ``incoming``, then
    make it ``latest`` in one rename: a kill during the save leaves the previous checkpoint."""
    accelerator.save_state(str(incoming))
    if accelerator.is_main_process:
        (incoming / PROGRESS_FILE).write_text(json.dumps(progress, sort_keys=True))
        (incoming / "fingerprint").write_text(fingerprint)
        shutil.rmtree(latest, ignore_errors=True)
        os.replace(incoming, latest)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator, latest: Path) -> dict:
    """Restore what :func:`_save_checkpoint` saved; returns the progress dict.

    Raises:
        PipelineError: the checkpoint cannot be read safely (a file that is not plain tensors and
            numbers: ``weights_only`` refuses to unpickle it, and nothing in it runs).
    """
    try:
        accelerator.load_state(str(latest))
    except Exception as exc:  # torch's UnpicklingError, safetensors' errors, a missing file
        why = " ".join(str(exc).split())[:200]  # one line, whatever the library's message holds
        raise PipelineError(f"{latest}: the training checkpoint cannot be loaded safely ({type(exc).__name__}: "
                            f"{why}); delete the folder to start the stage afresh") from None
    return json.loads((latest / PROGRESS_FILE).read_text())


def _check_finite(update: int, loss: float, grad_norm: float) -> None:
    """Stop before the optimizer step if the update's loss or gradient norm is NaN or infinite.

    Raises:
        PipelineError: naming the update; no weights are written.
    """
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise PipelineError(f"train: update {update} has loss {loss} and gradient norm {grad_norm}; stopping "
                            "before the optimizer step, so no model with non-finite weights is written "
                            "(check the rewards and log-probs, or lower train.learning_rate)")


def backward_minibatch(accelerator, model, task, micro: list[list[int]]) -> tuple[float, torch.Tensor, int]:
    """Forward and backward passes over one update's micro-batches (this process's share of the
    minibatch), leaving in ``.grad`` the gradient of the task's loss over the whole minibatch, on
    every process: the same gradient however the minibatch is split into micro-batches and
    processes (tests/test_minibatch.py checks 1, 2 and 4 micro-batches for every task).

    A task's ``forward`` returns its loss as a mean over ``task.loss_units(idx)`` units of the
    micro-batch: tokens for a token mean (PPO, SFT), examples for a mean over sequences or pairs
    (REBEL, DPO, GRPO, RLOO, the reward model). Averaging those means per micro-batch (what
    accelerate's division by ``gradient_accumulation_steps`` and DDP's average over processes do)
    would weigh a unit by the inverse of its micro-batch's total, and the loop groups micro-batches
    by length: a short response's tokens would count many times a long one's. Instead each
    micro-batch's loss is scaled by its share of the minibatch's units (all processes), times the
    G micro-batches and W processes accelerate and DDP divide by::

        backward( loss_m · units_m · G · W / Σ_{m', ranks} units_m' )

    so the gradient is that of Σ_m loss_m · units_m / Σ units, the objective's own mean over the
    whole minibatch: the minibatch-level normalisation of transformers' gradient-accumulation fix
    (``num_items_in_batch``, transformers 4.46) and of TRL's trainers, which is what a run with one
    micro-batch computes. With micro-batches of equal example counts and a mean over examples the
    scale is exactly 1.0, and the arithmetic is the same as averaging per micro-batch.

    Returns:
        (the minibatch's loss, the same on every process; the task's figures, example-weighted
        mean over the micro-batches and processes, (len(task.metric_names),); tokens processed here).
    """
    units = [int(task.loss_units(idx)) for idx in micro]
    total_units = int(accelerator.reduce(torch.tensor([sum(units)], device=accelerator.device), "sum").item())
    scale_to_minibatch = accelerator.gradient_accumulation_steps * accelerator.num_processes / total_units
    examples = sum(map(len, micro))
    loss_sum, figure_sums, tokens = 0.0, torch.zeros(len(task.metric_names)), 0
    for idx, n_units in zip(micro, units):
        with accelerator.accumulate(model), accelerator.autocast():
            loss, figures = task.forward(model, idx)
            accelerator.backward(loss * (n_units * scale_to_minibatch))  # ÷ G there (or by DeepSpeed), ÷ W by DDP
            loss_sum += n_units / total_units * float(loss.detach())
            figure_sums += len(idx) / examples * figures.detach().float().cpu()
        tokens += task.tokens(idx)
    if not accelerator.sync_gradients:
        raise RuntimeError("a minibatch's accumulation ended off its sync point")  # a bug, not bad input
    reduced_loss = float(accelerator.reduce(torch.tensor([loss_sum], device=accelerator.device), "sum").item())
    figures = accelerator.reduce(figure_sums.to(accelerator.device), "mean").cpu()
    return reduced_loss, figures, tokens


def _check_finite_weights(update: int, parameters: list[torch.nn.Parameter]) -> None:
    """Stop after an optimizer step that left a weight NaN or infinite (a finite gradient can still
    give one: an extreme learning rate, an overflow in Adam's moments).

    Raises:
        PipelineError: naming the update; the last checkpoint and the output folder are untouched.
    """
    with torch.no_grad():
        if all(bool(torch.isfinite(p).all()) for p in parameters):
            return
    raise PipelineError(f"train: the optimizer step of update {update} left non-finite weights; stopping, so no "
                        "model with them is written (lower the learning rate, or check the rewards and log-probs)")


def train_policy(model_dir: str | os.PathLike, task: TrainingTask, cfg: OptimizerParams, seed: int,
                 out_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, fingerprint: str,
                 progress: bool = True, on_update: Callable[[dict], None] | None = None,
                 where: str = "the training data",
                 evaluate: Callable[[torch.nn.Module], dict] | None = None) -> tuple[list[dict], dict]:
    """Train the policy from ``model_dir`` on ``task`` and save it to ``out_dir``.

    ``task``: a :class:`TrainingTask` (its members and their defaults are the loop's contract).
    ``cfg``: ``params.TrainParams`` or any ``params.OptimizerParams``.
    Resumes from ``checkpoint_dir`` when it holds a checkpoint with the same ``fingerprint``
    (same inputs and settings), and ends with the weights an uninterrupted run would have.
    ``on_update`` receives each update's log row on the main process (live MLflow metrics).
    ``where`` labels the inputs in error messages. ``evaluate`` receives the trained policy in eval
    mode on the main process, before it is saved, and returns figures for the summary (the SFT
    held-out loss); not under DeepSpeed ZeRO-3, whose main process holds only a shard.

    Returns:
        (one dict per update with :func:`train_log_columns`, summary for the metrics file).

    Raises:
        PipelineError: a sequence longer than the model's context, fewer episodes than one batch,
            ``evaluate`` under DeepSpeed, a checkpoint that cannot be loaded safely, a non-finite
            loss or gradient norm (before that update's optimizer step; nothing saved), or
            non-finite weights after a step (nothing saved).
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from rlhf_pipeline import lora
    from rlhf_pipeline.models import default_device, load_tokenizer, resolve_dtype
    from rlhf_pipeline.outputs import atomic_dir

    lora.check_quantization(cfg.lora, task.params_section)
    dtype = resolve_dtype(cfg.dtype, default_device())
    # accelerate keeps one state per process: create the Accelerator once, with its final settings.
    accelerator = make_accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
                                   gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if accelerator.state.deepspeed_plugin is not None and cfg.lora is not None:
        raise PipelineError(f"{task.params_section}.lora: LoRA is not wired for DeepSpeed ZeRO-3 here (the merge "
                            "needs the whole model on one process); launch without the DeepSpeed config")
    if accelerator.state.deepspeed_plugin is not None and evaluate is not None:
        raise PipelineError(f"{task.name}: the evaluation after training needs the whole policy on the main "
                            "process; DeepSpeed ZeRO-3 shards it (launch without the DeepSpeed config)")
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared: tell DeepSpeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step
    world, rank = accelerator.num_processes, accelerator.process_index
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    num_examples = len(task.lengths)
    total = cfg.total_episodes or num_examples * cfg.epochs
    num_updates = total // batch
    if num_updates == 0:
        raise PipelineError(f"train.total_episodes: {total} episodes is less than one batch of {batch} examples")

    columns = train_log_columns(task)

    set_seed(seed)
    tok = load_tokenizer(model_dir)
    quantization = lora.quantization_config(cfg.lora)
    if quantization is None:
        model = task.load_model(model_dir, torch.float32, accelerator.device)
    else:  # QLoRA: 4-bit base, bf16 compute
        model = task.load_model(model_dir, torch.bfloat16, accelerator.device, quantization_config=quantization)
    check_context_length(task.lengths, getattr(model.config, "max_position_embeddings", None), where, task.limit_keys)
    model.train()
    for module in model.modules():  # dropout off: log-probs must be those of the policy itself
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    if cfg.lora is not None:  # after the loop above: the LoRA dropout is the user's choice, kept
        model = lora.apply_lora(model, cfg.lora, task.peft_task_type,
                                cfg.gradient_checkpointing, task.params_section)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * num_updates), num_updates)
    # The scheduler is not prepared: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt = Path(checkpoint_dir)
    latest, incoming = ckpt / "latest", ckpt / "incoming"
    done, rows = 0, []
    if accelerator.is_main_process:
        shutil.rmtree(incoming, ignore_errors=True)  # a save that was killed half-way
        if latest.is_dir() and (latest / "fingerprint").read_text() != fingerprint:
            log.info("checkpoint in %s is for other inputs or settings; starting afresh", ckpt)
            shutil.rmtree(latest)
    accelerator.wait_for_everyone()
    if (latest / "fingerprint").is_file():
        state = _load_checkpoint(accelerator, latest)
        scheduler.load_state_dict(state["scheduler"])
        done, rows = state["update"], state["rows"]
        if "task" in state:
            task.load_state_dict(state["task"])
        log.info("resumed from update %d of %d", done, num_updates)
    resumed_from = done

    if accelerator.is_main_process:
        log.info("%s: %d updates of %d examples (%.3g epochs of %d examples)", task.name, num_updates, batch,
                 num_updates * batch / num_examples, num_examples)
    t_start = time.perf_counter()
    for u in range(done, num_updates):
        t0 = time.perf_counter()
        task.before_update(accelerator.unwrap_model(model), u * batch)  # online RL: a new rollout step
        mine = episode_slice(num_examples, seed, u * batch, (u + 1) * batch)[rank::world]
        # per_device_train_batch_size x gradient_accumulation_steps pairs: exactly that many
        # micro-batches, so accelerate's step count reaches its sync point at the last one.
        micro = [[mine[i] for i in group] for group in
                 length_grouped_batches([task.lengths[i] for i in mine], cfg.per_device_train_batch_size)]
        loss, figures, tokens = backward_minibatch(accelerator, model, task, micro)
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        _check_finite(u + 1, loss, grad_norm)
        optimizer.step()  # accelerate's wrapper: the one step of the update (DeepSpeed stepped in backward)
        optimizer.zero_grad(set_to_none=True)
        _check_finite_weights(u + 1, trainable)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - t0
        row = dict(zip(columns, [u + 1, (u + 1) * batch, loss, lr_now, grad_norm,
                                 *[float(x) for x in figures], tokens * world / seconds, seconds]))
        rows.append(row)
        if on_update is not None and accelerator.is_main_process:
            on_update(row)
        if progress and accelerator.is_main_process:
            eta = (time.perf_counter() - t_start) / (u + 1 - done) * (num_updates - u - 1)
            log.info("update %d/%d loss %.4f grad %.3f %s | %.0f tok/s, eta %s", u + 1, num_updates, row["loss"],
                     row["grad_norm"], " ".join(f"{k} {row[k]:.3f}" for k in task.metric_names),
                     row["tokens_per_second"], datetime.timedelta(seconds=round(eta)))
        if (u + 1) % cfg.save_every == 0 and u + 1 < num_updates:
            task_state = task.state_dict()
            _save_checkpoint(accelerator, incoming, latest, fingerprint,
                             {"update": u + 1, "rows": rows, "scheduler": scheduler.state_dict(),
                              **({"task": task_state} if task_state is not None else {})})

    accelerator.wait_for_everyone()
    # every process: ZeRO-3 gathers the shards here (LoRA saves through peft instead)
    weights = accelerator.get_state_dict(model) if cfg.lora is None else None
    if weights is not None:  # PPO: the policy's, not its critic's
        weights = task.policy_weights(weights)
    figures = {}
    if accelerator.is_main_process:
        policy = task.policy_of(accelerator.unwrap_model(model))
        if evaluate is not None:
            figures = evaluate(policy.eval())
        if cfg.gradient_checkpointing:
            policy.config.use_cache = True
        with atomic_dir(out_dir) as tmp:
            if cfg.lora is None:
                policy.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            else:  # QLoRA merges into the base reloaded in full precision, not into its 4-bit copy
                lora.save_lora(policy, tmp, None if quantization is None else
                               lambda: load(model_dir, torch.float32, torch.device("cpu")))
            tok.save_pretrained(tmp)
        shutil.rmtree(ckpt, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    summary = {"examples": num_examples, "updates": num_updates, "episodes": num_updates * batch, "batch_size": batch,
               "world_size": world, "distributed_type": str(accelerator.distributed_type.value),
               **({"zero_stage": accelerator.state.deepspeed_plugin.zero_stage}
                  if accelerator.state.deepspeed_plugin is not None else {}),
               "objective": task.name,
               "trainable_parameters": sum(p.numel() for p in trainable), "final_loss": rows[-1]["loss"], **figures,
               **{f"final_{k}": rows[-1][k] for k in task.metric_names}, "resumed_from_update": resumed_from,
               "seconds": round(seconds, 3), "dtype": str(dtype).removeprefix("torch."),
               "tokens_per_second": round(sum(r["tokens_per_second"] * r["seconds"] for r in rows[resumed_from:])
                                          / max(1e-9, sum(r["seconds"] for r in rows[resumed_from:])), 1)}
    return rows, summary


def train_and_write(model_dir: str | os.PathLike, task: TrainingTask, cfg: OptimizerParams, seed: int,
                    out_dir: str | os.PathLike, fingerprint: str, *, log_path: str | os.PathLike,
                    metrics_path: str | os.PathLike, metrics: Callable[[dict], dict], live_params: dict,
                    live_name: str, where: str, evaluate: Callable[[torch.nn.Module], dict] | None = None,
                    write_more: Callable[[], None] | None = None) -> None:
    """The tail every training stage shares: :func:`train_policy` into ``out_dir`` (checkpoints in
    ``<out_dir's folder>/.checkpoints/<out_dir's name>``), then, on the main process, ``write_more()``
    (online RL's rollouts), the per-update log (TSV) and ``metrics(summary)`` with the peak RSS (MB) as
    JSON, all in one output group: they appear together or not at all.

    ``live_params``/``live_name``: the MLflow run streamed while training when ``cfg.mlflow_live``,
    opened first, so an unreachable tracking server fails before the work.

    Raises:
        PipelineError: see :func:`train_policy` and ``tracking.live_run``.
    """
    from rlhf_pipeline.cli import peak_rss_mb
    from rlhf_pipeline.outputs import output_group, write_json, write_tsv
    from rlhf_pipeline.tracking import live_run

    out = Path(out_dir)
    main_process = is_main_process()
    with live_run(cfg.mlflow_live and main_process, live_params, live_name) as live:
        with output_group():
            rows, summary = train_policy(model_dir, task, cfg, seed, out, out.parent / ".checkpoints" / out.name,
                                         fingerprint, on_update=live.log_update if live else None, where=where,
                                         evaluate=evaluate)
            if main_process:
                if write_more is not None:
                    write_more()
                write_tsv(rows, train_log_columns(task), log_path)
                write_json({**metrics(summary), "peak_rss_mb": peak_rss_mb()}, metrics_path)
