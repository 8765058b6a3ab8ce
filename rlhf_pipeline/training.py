"""Policy optimisation on chosen/rejected pairs (REBEL recipe, part 4): REBEL, DPO, IPO, SimPO.

The loss is the only difference between the four (``rlhf_pipeline.losses``). Optimisation follows
the REBEL reference: AdamW (β1 0.9, β2 0.95, eps 1e-8, weight decay 1e-6), cosine schedule with
warm-up, gradient clipping, ``batch size = per_device_train_batch_size × gradient_accumulation_steps
× world_size`` pairs per update, ``num_updates = total_episodes // batch size``.

accelerate runs the same code as one CPU process or under ``accelerate launch`` on GPUs (DeepSpeed
ZeRO-3 config in ``envs/accelerate/``), and saves/restores resumable state: model, optimizer,
scheduler, RNG and the data position (the update count; the episode order is a pure function of
the seed, so the position is all that is needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import check_context_length, length_grouped_batches, sequence_logprobs
from rlhf_pipeline.losses import dpo_loss, ipo_loss, rebel_loss, simpo_loss
from rlhf_pipeline.params import TrainParams

log = logging.getLogger(__name__)

TRAIN_LOG_COLUMNS = ("update", "episodes", "loss", "learning_rate", "grad_norm", "kl_chosen", "kl_rejected",
                     "predicted_reward_gap", "target_reward_gap", "sign_agreement", "tokens_per_second", "seconds")


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


def episode_order(num_pairs: int, total_episodes: int, seed: int) -> list[int]:
    """Pair indices in training order: a seeded permutation per epoch, concatenated, cut at
    ``total_episodes``."""
    order: list[int] = []
    epoch = 0
    while len(order) < total_episodes:
        order.extend(np.random.default_rng([seed, epoch]).permutation(num_pairs).tolist())
        epoch += 1
    return order[:total_episodes]


def inputs_fingerprint(files: list[Path], cfg: TrainParams, seed: int) -> str:
    """SHA-256 of the training inputs and settings; a checkpoint is resumed only if it matches.

    The settings are the ``train.*`` keys the stage declares in dvc.yaml (not ``logprob_batch_size``,
    read by ``ref_logprobs`` only, nor ``mlflow_live``, which changes no weight).
    """
    settings = cfg.model_dump(exclude={"mlflow_live", "logprob_batch_size"})
    h = hashlib.sha256(json.dumps({"train": settings, "seed": seed}, sort_keys=True).encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


class _Progress:
    """Updates done and the log so far: saved with accelerate's state, so a resumed run knows
    where it stands in the episode order."""

    def __init__(self):
        self.update = 0
        self.rows: list[dict] = []

    def state_dict(self):
        return {"update": self.update, "rows": self.rows}

    def load_state_dict(self, state):
        self.update, self.rows = state["update"], list(state["rows"])


def _pair_loss(cfg: TrainParams, pc, pr, rc, rr, reward_c, reward_r, len_c, len_r) -> torch.Tensor:
    if cfg.loss == "rebel":
        return rebel_loss(pc, pr, rc, rr, reward_c, reward_r, cfg.eta)[0]
    if cfg.loss == "dpo":
        return dpo_loss(pc, pr, rc, rr, cfg.dpo_beta)
    if cfg.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, cfg.ipo_tau)
    return simpo_loss(pc, pr, len_c, len_r, cfg.simpo_beta, cfg.simpo_gamma)


def train_policy(model_dir: str | os.PathLike, pairs: pa.Table, ref: pa.Table, cfg: TrainParams, seed: int,
                 out_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, fingerprint: str,
                 progress: bool = True, on_update: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Train the policy from ``model_dir`` on ``pairs`` and save it to ``out_dir``.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint with the same ``fingerprint``
    (same inputs and settings), and ends with the weights an uninterrupted run would have.
    ``on_update`` receives each update's log row on the main process (live MLflow metrics).

    Returns:
        (one dict per update with ``TRAIN_LOG_COLUMNS``, summary for ``metrics/train.json``).

    Raises:
        PipelineError: empty or mismatched inputs, a sequence longer than the model's context, or
            fewer episodes than one batch.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, resolve_dtype
    from rlhf_pipeline.outputs import atomic_dir

    check_reference(pairs, ref, "data/pairs.parquet / data/ref_logprobs.parquet")
    dtype = resolve_dtype(cfg.dtype, default_device())
    # accelerate keeps one state per process: create the Accelerator once, with its final settings.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared: tell DeepSpeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    total = cfg.total_episodes or pairs.num_rows * cfg.epochs
    num_updates = total // batch
    if num_updates == 0:
        raise PipelineError(f"train.total_episodes: {total} episodes is less than one batch of {batch} pairs")

    prompts, chosen, rejected = (pairs.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    reward_c = torch.tensor(pairs.column("chosen_reward").to_pylist(), dtype=torch.float32)
    reward_r = torch.tensor(pairs.column("rejected_reward").to_pylist(), dtype=torch.float32)
    ref_c = torch.tensor(ref.column("chosen_logprob").to_pylist(), dtype=torch.float32)
    ref_r = torch.tensor(ref.column("rejected_logprob").to_pylist(), dtype=torch.float32)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]

    set_seed(seed)
    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, torch.float32, accelerator.device)
    check_context_length(lengths, getattr(model.config, "max_position_embeddings", None), "data/pairs.parquet")
    model.train()
    for module in model.modules():  # dropout off: log-probs must be those of the policy itself
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * num_updates), num_updates)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = _Progress()
    accelerator.register_for_checkpointing(scheduler, state)

    ckpt = Path(checkpoint_dir)
    latest, incoming = ckpt / "latest", ckpt / "incoming"
    resumed_from = 0
    if accelerator.is_main_process:
        shutil.rmtree(incoming, ignore_errors=True)  # a save that was killed half-way
        if latest.is_dir() and (latest / "fingerprint").read_text() != fingerprint:
            log.info("checkpoint in %s is for other inputs or settings; starting afresh", ckpt)
            shutil.rmtree(latest)
    accelerator.wait_for_everyone()
    if (latest / "fingerprint").is_file():
        accelerator.load_state(str(latest))
        resumed_from = state.update
        log.info("resumed from update %d of %d", resumed_from, num_updates)

    order = episode_order(pairs.num_rows, num_updates * batch, seed)
    t_start = time.perf_counter()
    pad = tok.pad_token_id
    for u in range(state.update, num_updates):
        t0 = time.perf_counter()
        mine = order[u * batch:(u + 1) * batch][rank::world]
        micro = [[mine[i] for i in group] for group in
                 length_grouped_batches([lengths[i] for i in mine], cfg.per_device_train_batch_size)]
        sums = torch.zeros(6)  # loss, kl_c, kl_r, predicted gap, target gap, sign agreement (pair-weighted)
        tokens = 0
        for k, idx in enumerate(micro):
            sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                logps = sequence_logprobs(model, [prompts[i] for i in idx] * 2,
                                          [chosen[i] for i in idx] + [rejected[i] for i in idx], pad, cfg.temperature)
                pc, pr = logps[: len(idx)], logps[len(idx):]
                rc, rr = ref_c[idx].to(pc.device), ref_r[idx].to(pc.device)
                gc, gr = reward_c[idx].to(pc.device), reward_r[idx].to(pc.device)
                lc = torch.tensor([len(chosen[i]) for i in idx], dtype=torch.float32, device=pc.device)
                lr_ = torch.tensor([len(rejected[i]) for i in idx], dtype=torch.float32, device=pc.device)
                loss = _pair_loss(cfg, pc, pr, rc, rr, gc, gr, lc, lr_)
                accelerator.backward(loss * len(idx) / len(mine))
            with torch.no_grad():
                predicted = ((pc - rc) - (pr - rr)) / cfg.eta
                target = gc - gr
                w = len(idx) / len(mine)
                sums += w * torch.stack([loss, (pc - rc).mean(), (pr - rr).mean(), predicted.mean(), target.mean(),
                                         (torch.sign(predicted) == torch.sign(target)).float().mean()]).detach().cpu()
            tokens += sum(2 * len(prompts[i]) + len(chosen[i]) + len(rejected[i]) for i in idx)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums.to(accelerator.device), "mean").cpu()
        seconds = time.perf_counter() - t0
        row = dict(zip(TRAIN_LOG_COLUMNS, [u + 1, (u + 1) * batch, *[float(x) for x in sums[:1]], lr_now,
                                            float(grad_norm), *[float(x) for x in sums[1:]],
                                            tokens * world / seconds, seconds]))
        state.rows.append(row)
        state.update = u + 1
        if on_update is not None and accelerator.is_main_process:
            on_update(row)
        if progress and accelerator.is_main_process:
            log.info("update %d/%d loss %.4f kl %.3f/%.3f grad %.3f", u + 1, num_updates, row["loss"],
                     row["kl_chosen"], row["kl_rejected"], row["grad_norm"])
        if state.update % cfg.save_every == 0 and state.update < num_updates:
            accelerator.save_state(str(incoming))
            if accelerator.is_main_process:
                (incoming / "fingerprint").write_text(fingerprint)
                shutil.rmtree(latest, ignore_errors=True)
                os.replace(incoming, latest)
            accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # every process: ZeRO-3 gathers the shards here
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model)
        if cfg.gradient_checkpointing:
            policy.config.use_cache = True
        with atomic_dir(out_dir) as tmp:
            policy.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            tok.save_pretrained(tmp)
        shutil.rmtree(ckpt, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    rows = state.rows
    summary = {"pairs": pairs.num_rows, "updates": num_updates, "episodes": num_updates * batch, "batch_size": batch,
               "world_size": world, "loss": cfg.loss, "final_loss": rows[-1]["loss"],
               "final_kl_chosen": rows[-1]["kl_chosen"], "final_kl_rejected": rows[-1]["kl_rejected"],
               "final_sign_agreement": rows[-1]["sign_agreement"], "resumed_from_update": resumed_from,
               "seconds": round(seconds, 3), "dtype": str(dtype).removeprefix("torch."),
               "tokens_per_second": round(sum(r["tokens_per_second"] * r["seconds"] for r in rows[resumed_from:])
                                          / max(1e-9, sum(r["seconds"] for r in rows[resumed_from:])), 1)}
    return rows, summary
