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



def bootstrap_ci(statistic, units: int, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of resampled units (Efron & Tibshirani 1993,
    ch. 13), for figures that are not a plain mean: IFEval's instruction-level accuracy is a ratio
    of sums over prompts (instructions followed / instructions), and the prompts, not the
    instructions, are the independent units, so a prompt's instructions are resampled together.

    Args:
        statistic: maps an int array (samples, units) of resampled unit indices to the
            (samples,) statistic of each resample, vectorised.
        units: how many units (prompts) there are. samples, confidence, seed: as
            :func:`bootstrap_mean_ci`; the same seed and units resample the same units, so the
            intervals of several figures of one set are coupled.

    Raises:
        PipelineError: no units.
    """
    if units == 0:
        raise PipelineError("bootstrap over no values: the held-out set is empty")
    rng = np.random.Generator(np.random.PCG64(seed))
    values = np.asarray(statistic(rng.integers(0, units, size=(samples, units))), dtype=np.float64)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)
