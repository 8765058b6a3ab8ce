"""The CPU's fp32 compute limit, measured in the same run as the benchmark that divides by it."""

from __future__ import annotations

import time

import torch


def matmul_gflops(dtype: torch.dtype) -> float:
    """Best GFLOP/s of a decode-shaped (64 x 576 x 1536) and a square 2048 matmul (2 m n k FLOP each),
    on all the process's threads. Shapes: SmolLM2-135M's hidden 576 and MLP 1536."""
    best = 0.0
    for m, k, n in ((64, 576, 1536), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        reps = max(3, int(2e10 // (2 * m * k * n)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best
