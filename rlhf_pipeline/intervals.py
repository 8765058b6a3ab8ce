"""Confidence intervals shared by the held-out evaluations (policies against the base policy, a
reward model's pairwise accuracy)."""

from __future__ import annotations

import numpy as np

from rlhf_pipeline.errors import PipelineError


def bootstrap_mean_ci(values: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13).

    Args:
        values: (units,) one value per unit (a held-out prompt, a held-out pair); units are
            resampled with replacement.
        samples: number of resamples. confidence: e.g. 0.95. seed: seeds numpy's PCG64, so the
            interval is a function of its inputs.

    Returns:
        (low, high), which contain the sample mean whenever ``samples`` is not tiny.

    Raises:
        PipelineError: ``values`` is empty.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise PipelineError("bootstrap over no values: the held-out set is empty")
    rng = np.random.Generator(np.random.PCG64(seed))
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)
