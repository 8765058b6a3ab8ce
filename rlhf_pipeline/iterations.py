"""Iterated REBEL (Gao et al. 2024, Algorithm 1): what distinguishes iteration t from another.

Iteration t samples from π_t, so it needs fresh prompts and fresh sampling seeds; everything else
(the stages, their code) is shared. Here: the iteration's number from its name, its seed, and its
chunk of the train prompts.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa

from rlhf_pipeline.errors import PipelineError


def iteration_number(name: str) -> int:
    """t of an iteration named ``iter_<t>`` (t ≥ 1).

    Raises:
        PipelineError: the name is not of that form.
    """
    match = re.fullmatch(r"iter_([1-9][0-9]*)", name)
    if not match:
        raise PipelineError(f"iteration {name!r}: expected iter_<t> with t = 1, 2, ...")
    return int(match.group(1))


def iteration_seed(seed: int, t: int) -> int:
    """The seed of iteration t: ``seed`` itself for t = 1, else 31 bits of SHA-256 of
    ``seed:iteration:t``, so iterations draw unrelated sampling seeds and episode orders even when
    they reuse the same prompts."""
    if t == 1:
        return seed
    digest = hashlib.sha256(f"{seed}:iteration:{t}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def check_iterations_fit(train_prompts: int, iterations: int, per_iteration: int, reuse: bool, where: str) -> None:
    """Every iteration's chunk of train prompts exists (:func:`iteration_prompts`), checked when the
    train split is made, before any iteration samples: otherwise iteration 15 of 50 fails after
    iterations 1–14 ran.

    Raises:
        PipelineError: naming ``iterations``, ``data.prompts_per_iteration`` and the train prompts.
    """
    need = per_iteration * (1 if reuse else iterations)
    if train_prompts < need:
        raise PipelineError(
            f"iterations: {iterations} iterations of data.prompts_per_iteration={per_iteration} disjoint prompts need "
            f"{need} train prompts, but {where} has {train_prompts}; use fewer iterations, lower "
            "data.prompts_per_iteration, raise data.num_prompts, or set data.reuse_prompts")


def iteration_prompts(train: pa.Table, t: int, per_iteration: int, reuse: bool, seed: int, where: str) -> pa.Table:
    """The train prompts of iteration t: chunk t (or chunk 1 when ``reuse``) of ``per_iteration``
    rows of a permutation of ``train`` sorted by ``prompt_id``, seeded by ``seed``.

    Chunks of different iterations are disjoint, and chunk t does not depend on how many iterations
    there are, so adding an iteration leaves the earlier ones' prompts (and outputs) as they were.

    Returns:
        the selected rows, sorted by ``prompt_id``.

    Raises:
        PipelineError: ``train`` has fewer than t × ``per_iteration`` rows (names ``where`` and the
            params keys).
    """
    chunk = 1 if reuse else t
    need = chunk * per_iteration
    if train.num_rows < need:
        raise PipelineError(
            f"{where}: iteration {t} needs train prompts {need - per_iteration + 1}..{need} "
            f"(data.prompts_per_iteration={per_iteration}) but there are {train.num_rows}; raise data.num_prompts, "
            "lower data.prompts_per_iteration, or set data.reuse_prompts")
    train = train.sort_by("prompt_id")
    order = np.random.default_rng(seed).permutation(train.num_rows)
    rows = sorted(order[need - per_iteration:need].tolist())
    return train.take(pa.array(rows, pa.int64()))
